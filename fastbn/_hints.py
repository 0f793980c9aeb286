"""What to install when an optional dependency is missing: one wording everywhere."""


def install_hint(package, extra):
    """``pip install`` advice for ``package`` (its pip name and version pin), which the
    extra ``extra`` of fastbn provides; fastbn is installed from its checkout, so the
    extra is spelled both ways."""
    return (f"pip install {package} (or fastbn's '{extra}' extra: pip install "
            f"\".[{extra}]\" in fastbn's checkout)")


def missing(what, package, extra):
    """``<what> is not installed: <install_hint>``."""
    return f"{what} is not installed: {install_hint(package, extra)}"
