# setuptools reads everything from pyproject.toml; this file exists only
# because cffi's API-mode build hook ("cffi_modules") has no pyproject key,
# and to build the jail's waiter, a program rather than a module.
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import LinkError

WAITER_SOURCE = "sandbox/waiter.c"
WAITER = "vfiouserd-waiter"


class BuildExtAndWaiter(build_ext):
    """The extension modules, then sandbox/waiter.c next to the jail's code.
    Linked statically: it is started once the daemon's root is empty, where
    no loader or library could be found."""

    def run(self) -> None:
        super().run()
        if self.inplace:
            build_py = self.get_finalized_command("build_py")
            target = build_py.get_package_dir("vfiouserd.sandbox")
        else:
            target = os.path.join(self.build_lib, "vfiouserd", "sandbox")
        objects = self.compiler.compile(
            [WAITER_SOURCE], output_dir=self.build_temp, extra_postargs=["-Wall", "-Wextra"]
        )
        try:
            self.compiler.link_executable(
                objects, WAITER, output_dir=target, extra_postargs=["-static"]
            )
        except LinkError as exc:
            raise LinkError(
                f"{exc}: the jail's waiter is linked statically, which needs the C "
                "library's static archive (libc.a: Debian's libc6-dev, glibc-static elsewhere)"
            ) from exc

    def get_outputs(self) -> list[str]:
        built = os.path.join(self.build_lib, "vfiouserd", "sandbox", WAITER)
        return [*super().get_outputs(), built]


setup(
    cmdclass={"build_ext": BuildExtAndWaiter},
    cffi_modules=["vfiouserd/_native_build.py:ffibuilder"],
)
