# pyasl_llama_source(<out_dir>): the pinned llama-cpp-python sdist, verified, extracted into the build
# folder, with patches/ applied to its vendor/llama.cpp. Sets <out_dir> to the extracted sdist root
# (<out_dir>/vendor/llama.cpp is the patched llama.cpp tree, <out_dir>/llama_cpp its Python layer).
#
# The sdist, first found of:
#   -DPYASL_LLAMA_SDIST=<file> or the environment variable PYASL_LLAMA_SDIST (must match the pinned SHA256)
#   <pyasl cache>/downloads/<name>: $PYASL_HOME, else $XDG_CACHE_HOME/pyasl, else ~/.cache/pyasl (like
#     pyasl/_paths.py cache_home(); scripts/build.py downloads there), when its SHA256 matches
#   a download from PyPI (files.pythonhosted.org), checked against the SHA256, kept in the build folder
# Version, SHA256 and URL are read from pyasl/_paths.py: the one place they are written.
#
# Re-running is cheap and incremental: a stamp (sdist SHA256 + patches' contents) skips the work when
# nothing changed, and when patches/ changed only files whose bytes differ are rewritten, so only those
# recompile in a reused build folder.

function(_pyasl_read_pin var key file)
    file(STRINGS "${file}" line REGEX "^${key} = \"[^\"]+\"")
    string(REGEX REPLACE "^${key} = \"([^\"]+)\".*$" "\\1" value "${line}")
    if (NOT value OR value STREQUAL line)
        message(FATAL_ERROR "pyasl: could not read ${key} = \"...\" from ${file}")
    endif()
    set(${var} "${value}" PARENT_SCOPE)
endfunction()

function(_pyasl_sha256_matches out file sha)
    set(ok FALSE)
    if (EXISTS "${file}" AND NOT IS_DIRECTORY "${file}")
        file(SHA256 "${file}" got)
        if (got STREQUAL sha)
            set(ok TRUE)
        endif()
    endif()
    set(${out} ${ok} PARENT_SCOPE)
endfunction()

function(_pyasl_find_sdist out name sha url workdir)
    # an explicit file must be the right one
    set(explicit "${PYASL_LLAMA_SDIST}")
    if (NOT explicit AND DEFINED ENV{PYASL_LLAMA_SDIST})
        set(explicit "$ENV{PYASL_LLAMA_SDIST}")
    endif()
    if (explicit)
        _pyasl_sha256_matches(ok "${explicit}" "${sha}")
        if (NOT ok)
            message(FATAL_ERROR "pyasl: PYASL_LLAMA_SDIST=${explicit} is missing or is not ${name} "
                                "(SHA256 ${sha}). Download it from ${url}")
        endif()
        set(${out} "${explicit}" PARENT_SCOPE)
        return()
    endif()
    # the pyasl download cache (shared with scripts/build.py), then an earlier download in this build folder
    if (DEFINED ENV{PYASL_HOME} AND NOT "$ENV{PYASL_HOME}" STREQUAL "")
        set(cache "$ENV{PYASL_HOME}")
    elseif (DEFINED ENV{XDG_CACHE_HOME} AND NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
        set(cache "$ENV{XDG_CACHE_HOME}/pyasl")
    elseif (DEFINED ENV{HOME})
        set(cache "$ENV{HOME}/.cache/pyasl")
    endif()
    foreach (candidate "${cache}/downloads/${name}" "${workdir}/${name}")
        _pyasl_sha256_matches(ok "${candidate}" "${sha}")
        if (ok)
            message(STATUS "pyasl: using ${candidate}")
            set(${out} "${candidate}" PARENT_SCOPE)
            return()
        endif()
    endforeach()
    message(STATUS "pyasl: downloading ${url}")
    file(DOWNLOAD "${url}" "${workdir}/${name}.part" EXPECTED_HASH SHA256=${sha} TLS_VERIFY ON
         STATUS st INACTIVITY_TIMEOUT 120)
    list(GET st 0 code)
    if (NOT code EQUAL 0)
        list(GET st 1 why)
        file(REMOVE "${workdir}/${name}.part")
        message(FATAL_ERROR "pyasl: could not download ${url}: ${why}\n"
                            "Download ${name} (SHA256 ${sha}) by hand and build with "
                            "PYASL_LLAMA_SDIST=/path/to/${name} in the environment "
                            "(or put it in ${cache}/downloads/).")
    endif()
    file(RENAME "${workdir}/${name}.part" "${workdir}/${name}")
    set(${out} "${workdir}/${name}" PARENT_SCOPE)
endfunction()

function(_pyasl_apply_patches tree patches)
    find_program(PYASL_PATCH_EXE patch)
    find_program(PYASL_GIT_EXE git)
    foreach (p IN LISTS patches)
        get_filename_component(pname "${p}" NAME)
        if (PYASL_PATCH_EXE)
            set(check "${PYASL_PATCH_EXE}" -p1 -N -s --dry-run -i "${p}")
            set(apply "${PYASL_PATCH_EXE}" -p1 -N -s -i "${p}")
        elseif (PYASL_GIT_EXE)
            set(check "${PYASL_GIT_EXE}" apply -p1 --check "${p}")
            set(apply "${PYASL_GIT_EXE}" apply -p1 "${p}")
        else()
            message(FATAL_ERROR "pyasl: applying patches/ needs `patch` or `git`; install one of them "
                                "(e.g. apt-get install patch)")
        endif()
        execute_process(COMMAND ${check} WORKING_DIRECTORY "${tree}" RESULT_VARIABLE rc
                        OUTPUT_VARIABLE out ERROR_VARIABLE out)
        if (NOT rc EQUAL 0)
            message(FATAL_ERROR "pyasl: ${pname} does not apply cleanly to the pinned llama.cpp:\n${out}")
        endif()
        execute_process(COMMAND ${apply} WORKING_DIRECTORY "${tree}" RESULT_VARIABLE rc
                        OUTPUT_VARIABLE out ERROR_VARIABLE out)
        if (NOT rc EQUAL 0)
            message(FATAL_ERROR "pyasl: applying ${pname} failed:\n${out}")
        endif()
    endforeach()
endfunction()

function(pyasl_llama_source out_dir)
    set(root "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/..")
    get_filename_component(root "${root}" ABSOLUTE)
    set(paths_py "${root}/pyasl/_paths.py")
    _pyasl_read_pin(version LLAMA_CPP_PYTHON_VERSION "${paths_py}")
    _pyasl_read_pin(sha LLAMA_CPP_PYTHON_SDIST_SHA256 "${paths_py}")
    _pyasl_read_pin(url LLAMA_CPP_PYTHON_SDIST_URL "${paths_py}")
    set(name "llama_cpp_python-${version}.tar.gz")

    file(GLOB patches "${root}/patches/*.patch")
    list(SORT patches)
    set_property(DIRECTORY "${CMAKE_SOURCE_DIR}" APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${patches} "${paths_py}")
    set(digest_input "${sha}")
    foreach (p IN LISTS patches)
        get_filename_component(pname "${p}" NAME)
        file(SHA256 "${p}" psha)
        string(APPEND digest_input ";${pname}:${psha}")
    endforeach()
    string(SHA256 digest "${digest_input}")

    set(work "${CMAKE_BINARY_DIR}/_pyasl")
    set(dest "${work}/llama_cpp_python-${version}")
    set(stamp "${dest}.stamp")
    set(${out_dir} "${dest}" PARENT_SCOPE)
    if (EXISTS "${stamp}" AND EXISTS "${dest}/vendor/llama.cpp/src/llama.cpp")
        file(READ "${stamp}" have)
        if (have STREQUAL digest)
            return()
        endif()
    endif()

    file(MAKE_DIRECTORY "${work}")
    _pyasl_find_sdist(sdist "${name}" "${sha}" "${url}" "${work}")
    set(stage "${work}/stage")
    file(REMOVE_RECURSE "${stage}")
    message(STATUS "pyasl: extracting llama.cpp and the llama_cpp Python layer from ${name}")
    set(top "llama_cpp_python-${version}")
    file(ARCHIVE_EXTRACT INPUT "${sdist}" DESTINATION "${stage}"
         PATTERNS "${top}/vendor/llama.cpp" "${top}/llama_cpp" "${top}/LICENSE.md")
    if (NOT EXISTS "${stage}/${top}/vendor/llama.cpp/src/llama.cpp")
        message(FATAL_ERROR "pyasl: ${sdist} holds no ${top}/vendor/llama.cpp")
    endif()
    # its .git names the submodule folder of llama-cpp-python's own clone: stale here (git would fail on it)
    file(REMOVE "${stage}/${top}/vendor/llama.cpp/.git")
    list(LENGTH patches npatches)
    message(STATUS "pyasl: applying ${npatches} patches from patches/")
    _pyasl_apply_patches("${stage}/${top}/vendor/llama.cpp" "${patches}")

    if (NOT EXISTS "${dest}")
        file(RENAME "${stage}/${top}" "${dest}")
    else()
        # patches changed in a reused build folder: rewrite only the files that differ
        file(GLOB_RECURSE files RELATIVE "${stage}/${top}" "${stage}/${top}/*")
        foreach (f IN LISTS files)
            get_filename_component(d "${dest}/${f}" DIRECTORY)
            if (NOT IS_DIRECTORY "${d}")
                file(MAKE_DIRECTORY "${d}")
            endif()
            file(COPY_FILE "${stage}/${top}/${f}" "${dest}/${f}" ONLY_IF_DIFFERENT)
        endforeach()
    endif()
    file(REMOVE_RECURSE "${stage}")
    file(WRITE "${stamp}" "${digest}")
endfunction()
