"""The checks every lesson script uses: print what was got and what was expected, stop at the first mismatch.

    check(name, got, expected, tol)   numbers or tensors: max |got - expected| <= tol, compared in float64
    check_equal(name, got, expected)  exact equality (counts, shapes, lists)
    check_true(name, got, expected, ok)  a measured value against a stated expectation (e.g. "< 0.5"):
                                       ok is the bool the script computed from got
    check_quoted(name, text, phrase, values, tol)  numbers a README quotes from this script: the README
                                       must contain `phrase` (each number written {}), and the numbers it
                                       shows there must equal the measured `values` within tol, so a README
                                       cannot drift from the run it reports

Every line shows the value itself, so a reader sees "got 0.7731, expected > 0" rather than only "[ok]".
A lesson script imports them with
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
    from checks import check, check_equal, check_true
"""

import re

import torch


def _value(t: torch.Tensor) -> str:
    """A short printout of a float64 tensor: the number itself, or its shape and first entries."""
    if t.numel() == 1:
        v = t.item()
        return f"{int(v):,}" if v.is_integer() and abs(v) < 1e15 else f"{v:.6g}"
    flat = ", ".join(f"{v:.4g}" for v in t.flatten()[:3].tolist())
    return f"{tuple(t.shape)} [{flat}{', ...' if t.numel() > 3 else ''}]"


def check(name, got, expected, tol=0.0):
    """Print one check with both values; raise AssertionError when max |got - expected| > tol."""
    got = torch.as_tensor(got, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    err = (got - expected).abs().max().item()
    print(f"  [{'ok' if err <= tol else 'FAIL'}] {name}: got {_value(got)}, expected {_value(expected)}"
          f"   (max |diff| {err:.1e}, tol {tol:.0e})")
    assert err <= tol, f"{name}: max |diff| {err:.3e} exceeds {tol:.1e} (got {_value(got)}, expected {_value(expected)})"


def _shown(value) -> str:
    """Integers with thousands separators; long lists and texts cut to their start."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"[{', '.join(map(str, value[:6]))}, ... ({len(value)} items)]"
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:40]) + f"... ({len(value)} characters)"
    return f"{value}"


def check_equal(name, got, expected):
    """Exact equality (integers are printed with thousands separators)."""
    ok = got == expected
    print(f"  [{'ok' if ok else 'FAIL'}] {name}: got {_shown(got)}, expected {_shown(expected)}")
    assert ok, f"{name}: got {_shown(got)}, expected {_shown(expected)}"


def check_true(name, got, expected: str, ok: bool):
    """A measured property: `got` (a number or text), `expected` a stated condition such as "> 0" or
    "< full fine-tuning's 2.10"; `ok` is that condition evaluated by the script."""
    shown = f"{got:.4g}" if isinstance(got, float) else _shown(got)
    print(f"  [{'ok' if ok else 'FAIL'}] {name}: got {shown}, expected {expected}")
    assert ok, f"{name}: got {shown}, expected {expected}"


def check_quoted(name, text, phrase, values, tol):
    """The numbers `text` (a README) shows where it says `phrase`, against the measured `values`.

    `phrase` is a piece of the README with every quoted number written as {}; any run of spaces in it also
    matches a line break. tol: half the last digit shown (0.005 for two decimals) for a deterministic run,
    or the run-to-run spread the script states for one that is not."""
    pattern = re.escape(phrase).replace(r"\{\}", r"([-−+]?[0-9][0-9,]*(?:\.[0-9]+)?)")
    pattern = re.sub(r"(\\ )+", r"\\s+", pattern)
    match = re.search(pattern, text)
    print(f"  [{'ok' if match else 'FAIL'}] {name}: the README says {phrase!r}")
    assert match, f"{name}: the README no longer says {phrase!r} (rerun the script and update the README)"
    quoted = [float(g.replace(",", "").replace("−", "-")) for g in match.groups()]
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    check(f"{name}: the numbers it quotes == measured", quoted, values, tol)
