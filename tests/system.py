"""System packages the tests need (Debian's): installed when missing, else a clear error."""

import os
import shutil
import subprocess


def apt_install(package: str) -> None:
    """Install a Debian package (as root, with apt-get); does nothing elsewhere: callers
    check for what they need afterwards and fail saying what is missing."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                   env=env, capture_output=True)


def program(name: str, package: str) -> str:
    """The path of `name`, installing Debian's `package` for it if needed."""
    if shutil.which(name) is None:
        apt_install(package)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed and could not be installed: "
                           f"apt-get install {package}")
    return found
