"""What people use: the command line (:mod:`.cli`), the terminal chat (:mod:`.chat`), the
OpenAI-compatible server (:mod:`.server`) and the llama-cpp-python drop-in (:mod:`.llama`)."""
