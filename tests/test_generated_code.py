"""The cache of generated code (vfiouserd.generated_code): what compile,
exec and eval give while it is installed is what the builtins give, from the
file when it holds that source for those flags, and compiled otherwise."""

from __future__ import annotations
import __future__

import ast
import builtins
import dataclasses
import subprocess
import sys
from collections import namedtuple

import attrs
import pytest

from vfiouserd import generated_code
from vfiouserd.generated_code import GeneratedCode

FUTURE = __future__.annotations.compiler_flag  # this module's, inherited by compile()
BUILTINS = (builtins.compile, builtins.exec, builtins.eval)
SOURCE = "def double(x):\n    return 2 * x\n"
# Annotations evaluated only without `from __future__ import annotations`.
ANNOTATED = "def f(x: not_defined_anywhere) -> None:\n    pass\n"


@pytest.fixture
def cache_path(tmp_path):
    return str(tmp_path / "__pycache__" / "generated.bin")


def installed(path: str) -> GeneratedCode:
    cache = GeneratedCode(path)
    cache.load()
    cache.install()
    return cache


def compiled_twice(path: str, run) -> tuple[GeneratedCode, GeneratedCode, object, object]:
    """run() under a fresh cache, saved; then under one loaded from the file."""
    first = installed(path)
    try:
        before = run()
    finally:
        first.uninstall()
    assert first.save()
    second = installed(path)
    try:
        after = run()
    finally:
        second.uninstall()
    return first, second, before, after


def test_code_from_the_file_is_the_code_compile_makes(cache_path):
    first, second, before, after = compiled_twice(
        cache_path, lambda: compile(SOURCE, "<generated double>", "exec")
    )
    assert (first.misses, first.hits) == (1, 0)
    assert (second.misses, second.hits) == (0, 1)
    assert (
        before
        == after
        == builtins.compile(SOURCE, "<generated double>", "exec", flags=FUTURE, dont_inherit=True)
    )
    namespace: dict = {}
    exec(after, namespace)
    assert namespace["double"](21) == 42


def test_exec_and_eval_of_source_with_globals_use_it(cache_path):
    def run():
        namespace: dict = {"base": 40}
        exec("def add(x):\n    return base + x\n", namespace)
        return namespace["add"](2), eval(
            "  base + 1", {"base": 1}
        )  # leading blanks, as the builtin

    _, second, before, after = compiled_twice(cache_path, run)
    assert before == after == (42, 2)
    assert (second.hits, second.misses) == (2, 0)


def test_the_callers_future_flags_are_part_of_the_key(cache_path):
    """This module has `from __future__ import annotations`: compile() called
    here inherits it; code compiled without the flag is another entry."""
    without_future = builtins.compile(
        "exec(source, {})", "<caller without the future>", "exec", dont_inherit=True
    )
    cache = installed(cache_path)
    try:
        postponed = compile(ANNOTATED, "<annotated>", "exec")
        evaluated = compile(ANNOTATED, "<annotated>", "exec", dont_inherit=True)
        exec(postponed, {})  # the annotation is a string, never evaluated
        with pytest.raises(NameError):
            exec(evaluated, {})
        # exec() of source inherits the caller's flags too.
        with pytest.raises(NameError):
            exec(without_future, {"source": ANNOTATED})
        exec(ANNOTATED, {})
        assert (cache.misses, cache.hits) == (4, 0)
        exec(ANNOTATED.encode())  # bytes, in this namespace: not cached, same flags
        exec(ANNOTATED.replace("f(", "g("))
        exec(ANNOTATED, {})  # the same again: the entry made just now
        with pytest.raises(NameError):
            exec(without_future, {"source": ANNOTATED})
    finally:
        cache.uninstall()
    assert (cache.misses, cache.hits) == (5, 2)


def test_what_it_does_not_answer_goes_to_the_builtins_unchanged(cache_path):
    cache = installed(cache_path)
    try:
        tree = ast.parse("x = 1")  # compile(..., PyCF_ONLY_AST): a tree, not code
        assert isinstance(tree, ast.Module)
        x = 20
        assert eval("x + 1") == 21  # no globals: the caller's namespace
        exec("assert x == 20")
        assert x == 20
        code = compile(b"y = 2\n", "<bytes>", "exec")  # bytes source
        namespace: dict = {}
        exec(code, namespace)
        assert namespace["y"] == 2
        for bad in ("def (:", "x = 1\0"):
            with pytest.raises((SyntaxError, ValueError)) as cached:
                compile(bad, "<bad>", "exec")
            with pytest.raises(type(cached.value)) as builtin:
                builtins.compile(bad, "<bad>", "exec")
            assert str(cached.value) == str(builtin.value)
            with pytest.raises(type(cached.value)):
                exec(bad, {})
        with pytest.raises(TypeError, match="exec"):
            exec(42)
    finally:
        cache.uninstall()
    assert (builtins.compile, builtins.exec, builtins.eval) == BUILTINS


def test_classes_attrs_dataclasses_and_namedtuple_generate_are_the_same(cache_path):
    def define():
        @attrs.frozen
        class Point:
            x: int
            y: int = 0

        @dataclasses.dataclass(order=True)
        class Size:
            width: int
            height: int = dataclasses.field(default=1)

        pair = namedtuple("pair", "left right")
        return (
            repr(Point(1)),
            Point(1, 2) == Point(1, 2),
            hash(Point(1, 2)) == hash(Point(1, 2)),
            repr(Size(3)),
            Size(1, 2) < Size(2, 0),
            pair(1, right=2),
        )

    first, second, before, after = compiled_twice(cache_path, define)
    assert before == after == define()
    assert first.misses > 0 and second.hits > 0
    # attrs writes the process's hash seed into __hash__: that one misses.
    assert second.misses <= 1


def test_a_damaged_or_foreign_file_is_ignored(cache_path):
    cache = installed(cache_path)
    compile(SOURCE, "<f>", "exec")
    cache.uninstall()
    assert cache.save()
    with open(cache_path, "rb") as f:
        good = f.read()
    source = SOURCE.encode()
    where = good.index(source)
    damaged = {
        "truncated": good[: len(good) // 2],
        "foreign": good.replace(generated_code.MAGIC, b"x" * len(generated_code.MAGIC)),
        "garbage": generated_code.MAGIC + b"\xff" * 64,
        # The entry's source differs from the one asked for (same length):
        # its code must not be used.
        "other source": good[:where] + source.replace(b"2 *", b"3 *") + good[where + len(source) :],
        "bad code": good[: where + len(source)] + b"\x00" * (len(good) - where - len(source)),
        "empty": b"",
    }
    for name, content in damaged.items():
        with open(cache_path, "wb") as f:
            f.write(content)
        cache = installed(cache_path)
        try:
            code = compile(SOURCE, "<f>", "exec")
        finally:
            cache.uninstall()
            cache.close()
        assert (cache.hits, cache.misses) == (0, 1), name
        namespace: dict = {}
        exec(code, namespace)
        assert namespace["double"](2) == 4, name


def test_a_program_writes_the_file_only_when_there_is_none(cache_path, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    first = installed(cache_path)
    compile(SOURCE, "<f>", "exec")
    first.uninstall()
    assert first.save_if_none()
    second = installed(cache_path)
    compile(SOURCE.replace("2", "4"), "<g>", "exec")  # a miss
    second.uninstall()
    assert not second.save_if_none()  # the file stays as it was
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    third = GeneratedCode(cache_path + ".other")
    third.install()
    compile(SOURCE, "<f>", "exec")
    third.uninstall()
    assert not third.save_if_none()


def test_the_file_holds_every_devices_generated_code(tmp_path):
    """python -m vfiouserd.generated_code (make bytecode) writes the entries
    of every plugin and both protocols."""
    path = str(tmp_path / "generated.bin")
    command = [sys.executable, "-m", "vfiouserd.generated_code", path]
    subprocess.run(command, check=True, timeout=60)
    cache = GeneratedCode(path)
    cache.load()
    names = [key[0] for key in cache.entries]
    cache.close()
    # trio's classes (attrs), and the dataclasses and namedtuples of the
    # devices and both protocols (exec and eval of <string>).
    assert sum(" trio." in name for name in set(names)) > 40
    assert names.count("<string>") > 100
