"""The project's own stateful fuzzer (``fuzz/``), a short deterministic run
per device: the real daemon, jailed, against fixed seeds. Every case is
followed by the harness's checks (a fresh handshake, fds and memory back to
baseline, no crash in the log); any finding fails the test with the lines
that replay it. ``make fuzz`` runs the same cases for as long as asked."""

from __future__ import annotations

import time

import pytest

from fuzz.harness import DEVICES, Finding, Harness

SEED = 11
# About 10 s a device on 2 cores.
CASES = {
    "vhost-user-blk": 150,
    "vhost-user-rng": 120,
    "vhost-user-console": 120,
    "vhost-user-vsock": 120,
    "vhost-user-net": 120,
    "vfio-user-blk": 100,
    "vfio-user-example": 120,
}


def report(findings: list[Finding]) -> str:
    lines = [finding.line() for finding in findings]
    first = findings[0]
    lines.append(f"trace of case {first.case}:")
    lines += [f"  {step}" for step in first.trace[-40:]]
    lines.append("daemon log during it:")
    lines += [f"  {line}" for line in first.log_excerpt.splitlines()[-30:]]
    return "\n".join(lines)


@pytest.mark.parametrize("device", sorted(CASES))
async def test_fuzz_cases_find_nothing(device, tmp_path):
    assert set(CASES) == set(DEVICES)
    harness = Harness(DEVICES[device], tmp_path, SEED)
    findings: list[Finding] = []
    kinds: set[str] = set()
    started = time.monotonic()
    await harness.start()
    try:
        for index in range(CASES[device]):
            result = await harness.run_case(index)
            kinds.add(result.kind)
            findings += result.findings
            if result.findings:
                await harness.restart(index + 1)
    finally:
        harness.stop()
    print(
        f"{device}: {CASES[device]} cases, {len(kinds)} kinds, {time.monotonic() - started:.1f} s"
    )
    assert not findings, report(findings)
    assert len(kinds) >= 6, f"only {sorted(kinds)} ran"  # the draws reach most kinds
