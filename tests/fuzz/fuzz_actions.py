"""Fuzz the AutoUI action parser (digiq.actions) with atheris (coverage-guided, libFuzzer).

Not collected by pytest (no ``test_`` prefix). Run from the repository root:

    nice -n 19 .venv/bin/python tests/fuzz/fuzz_actions.py -max_total_time=300 -print_final_stats=1

(``pip install atheris``; add a corpus folder as the last argument to keep what it learns between runs;
``--seed-corpus DIR`` first writes official strings of every action type there as starting points.)
A crash prints the failing input and writes it to ``crash-<sha1>``; replay it with
``.venv/bin/python tests/fuzz/fuzz_actions.py crash-<sha1>`` and add it to tests/test_actions.py.

Each input is decoded in one of four modes (its first byte modulo 4; mode 0 reads the rest as UTF-8
text, so ``printf '\\0%s' "$ACTION" > corpus/seed`` makes a seed); the properties are the contract of
digiq/actions.py:

- raw text: ``parse_action`` returns an Action or raises ActionParseError, never another exception;
  what it accepts re-parses to the same Action from its formatted form, and an accepted string whose
  coordinates all have the same number of decimals (as every string the official data writes) is
  already in canonical form, ``format_action(parse_action(s)) == s``;
- template: the same on decision strings whose five parts are fuzzed text (reaches the number and
  point parsers far more often than raw text);
- official: strings written as the official code writes them (equal decimals) always parse, and
  format back byte for byte;
- action: every Action that can be constructed round-trips, ``parse_action(format_action(a)) == a``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["digiq"]):
    from digiq.actions import _DECISION, DECISION_SEPARATOR, _split_plan, format_action, parse_action
    from digiq.errors import ActionParseError
    from digiq.schema import MAX_DECIMALS, NO_POINT_TEXT, Action, ActionType

from pydantic import ValidationError

TYPES = [t.value for t in ActionType]


def _text(fdp: atheris.FuzzedDataProvider, limit: int = 40) -> str:
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, limit))


def check_text(text: str) -> None:
    """Properties of parse_action on any string."""
    try:
        action = parse_action(text)
    except ActionParseError:
        return
    formatted = format_action(action)
    assert parse_action(formatted) == action, f"re-parse of {formatted!r} differs from {action!r}"
    if _fixed_precision(text):
        assert formatted == text, f"accepted {text!r} but it formats as {formatted!r}"


def _fixed_precision(text: str) -> bool:
    """True when every coordinate of an accepted string is written with the same number of decimals."""
    match = _DECISION.fullmatch(_split_plan(text)[1])
    assert match is not None
    points = [match[name] for name in ("touch_point", "lift_point") if match[name] != NO_POINT_TEXT]
    return len({len(number.partition(".")[2]) for point in points for number in point.split(", ")}) <= 1


def template_text(fdp: atheris.FuzzedDataProvider) -> str:
    action_type = fdp.PickValueInList(TYPES) if fdp.ConsumeBool() else _text(fdp, 12)
    touch, lift, typed = _text(fdp, 24), _text(fdp, 24), _text(fdp, 24)
    decision = f'"action_type": "{action_type}", "touch_point": "[{touch}]", "lift_point": "[{lift}]", "typed_text": "{typed}"'
    return f"Action Plan: [{_text(fdp, 24)}] ; Action Decision: {decision}" if fdp.ConsumeBool() else decision


def official_text(fdp: atheris.FuzzedDataProvider) -> str:
    """As AutoUI / DigiRL's to_autoui write it: f-strings, every coordinate with the same decimals."""
    action_type = fdp.PickValueInList(TYPES)
    if action_type == "DUAL_POINT":
        d = fdp.ConsumeIntInRange(0, MAX_DECIMALS)
        y, x, ly, lx = (fdp.ConsumeProbability() for _ in range(4))
        points = f'"touch_point": "[{y:.{d}f}, {x:.{d}f}]", "lift_point": "[{ly:.{d}f}, {lx:.{d}f}]"'
    else:
        points = '"touch_point": "[-1.0, -1.0]", "lift_point": "[-1.0, -1.0]"'
    typed = _text(fdp) if action_type == "TYPE" else ""
    decision = f'"action_type": "{action_type}", {points}, "typed_text": "{typed}"'
    plan = _text(fdp, 30) if fdp.ConsumeBool() else None
    if plan is None or DECISION_SEPARATOR in plan:
        return decision
    return f"Action Plan: [{plan}] ; Action Decision: {decision}"


def check_official(text: str) -> None:
    assert format_action(parse_action(text)) == text, f"official string {text!r} does not round-trip"


def fuzzed_action(fdp: atheris.FuzzedDataProvider) -> Action | None:
    """An Action from fuzzed fields (None when the fields are not a valid Action)."""
    action_type = fdp.PickValueInList(TYPES)
    def point() -> tuple[float, float]:
        if fdp.ConsumeBool():
            return (-1.0, -1.0)
        return (fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeProbability(), fdp.ConsumeProbability())
    touch = point()
    lift = touch if fdp.ConsumeBool() else point()
    decimals = None if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, MAX_DECIMALS)
    plan = _text(fdp, 30) if fdp.ConsumeBool() else None
    try:
        return Action(action_type=action_type, touch_point=touch, lift_point=lift, typed_text=_text(fdp),
                      plan=plan, decimals=decimals)
    except ValidationError:
        return None


def check_action(action: Action) -> None:
    text = format_action(action)
    assert parse_action(text) == action, f"{action!r} formats as {text!r}, which parses as {parse_action(text)!r}"


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 4, data[1:]
    if mode == 0:  # the rest is the text itself (UTF-8), so seeds and crash files are readable
        check_text(rest.decode("utf-8", "replace"))
        return
    fdp = atheris.FuzzedDataProvider(rest)
    if mode == 1:
        check_text(template_text(fdp))
    elif mode == 2:
        check_official(official_text(fdp))
    elif (action := fuzzed_action(fdp)) is not None:
        check_action(action)


SEEDS = [
    'Action Plan: [DUAL_POINT,TYPE] ; Action Decision: "action_type": "DUAL_POINT", "touch_point": "[0.5200, 0.3100]", '
    '"lift_point": "[0.5200, 0.3100]", "typed_text": ""',
    '"action_type": "DUAL_POINT", "touch_point": "[0.8000, 0.5000]", "lift_point": "[0.2000, 0.5000]", "typed_text": ""',
    '"action_type": "TYPE", "touch_point": "[-1.0, -1.0]", "lift_point": "[-1.0, -1.0]", "typed_text": "say \\"hi\\""',
    *(f'Action Plan: [{t}] ; Action Decision: "action_type": "{t}", "touch_point": "[-1.0, -1.0]", '
      f'"lift_point": "[-1.0, -1.0]", "typed_text": ""' for t in TYPES if t not in ("DUAL_POINT", "TYPE")),
]


def write_seeds(folder: str) -> None:
    """Mode-0 seed files (official strings) in ``folder``."""
    from pathlib import Path

    Path(folder).mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(SEEDS):
        (Path(folder) / f"seed-{i}").write_bytes(b"\0" + seed.encode())


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--seed-corpus":
        write_seeds(sys.argv[2])
        del sys.argv[1]
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
