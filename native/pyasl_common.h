// Internal helpers shared by native/*.cpp.
#pragma once

#include "pyasl.h"

#include <string>

void pyasl_set_error(const std::string & msg);

#define PYASL_FAIL(code, msg) do { pyasl_set_error(msg); return (code); } while (0)
