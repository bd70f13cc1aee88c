"""Errors a user can fix. The command line prints them as one line, never a traceback."""


def one_line(text: object) -> str:
    """A message (a library's, often several lines) as one line, for an error of ours."""
    return " ".join(str(text).split())


class ServegenError(Exception):
    """A mistake in what the user gave us (flags, configs, data) or a failure they must act on."""


class ConfigError(ServegenError):
    """A cluster config or job config that cannot be used; the message names the file and the key."""


class ServerError(ServegenError):
    """A model server that died, never became ready, or could not be started."""


class ConversionError(ServegenError):
    """A model folder a conversion cannot take (missing, partial, unsupported), or a target it
    cannot write; the message names the folder and what to fix."""
