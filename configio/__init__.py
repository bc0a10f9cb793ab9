"""The foundation every other package builds on: typed settings and crash-safe files.

    configio.errors   the one-line error types a job turns into `error: ...` and exit status 2
    configio.config   dataclass settings from YAML plus dotted `key=value` overrides, checked before any work
    configio.files    atomic writes (with the user's umask), safetensors and pickle-free state

It imports nothing from this project and importing it changes nothing in the process.
"""
