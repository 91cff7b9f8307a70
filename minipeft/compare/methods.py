"""What the comparison reads from the PEFT registry (minipeft/peft/registry.py) and keeps no table of its own:
the order of the tables, each method's title, its default learning rate and its sweep grid. A method registered
from outside the package (a plugin) is compared like a built-in one when --methods names it; what it does not
declare (a title, a rate, a grid, a 7B config) the comparison does without, or asks for on the command line.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

from ..peft import METHODS, get_method

# The order of the reference table, with the Houlsby adapter as a sixth: the built-in methods, and what
# --methods runs when not given. Methods registered later follow them in registry order.
REFERENCE_ORDER = ("full", "lora", "llama_adapter", "prompt", "prefix", "adapter")


def method_order() -> Tuple[str, ...]:
    """Every registered method, in table order."""
    return tuple(m for m in REFERENCE_ORDER if m in METHODS) + tuple(m for m in METHODS if m not in REFERENCE_ORDER)


def ordered(names: Iterable[str]) -> List[str]:
    """The methods among `names` in table order (a name no longer registered, e.g. from an older results.json,
    comes last, in the order given)."""
    names = list(names)
    known = [m for m in method_order() if m in names]
    return known + [m for m in names if m not in known]


def title(name: str) -> str:
    """The method's name in tables and plots (the registry's title, else its name)."""
    return METHODS[name].display_title if name in METHODS else name


def default_lr(name: str) -> float:
    """The rate tuned for compare_methods.py's default budget; PeftConfigError naming --lr if the method has none."""
    return get_method(name, source="--methods").learning_rate("comparison", flag="--lr")


def default_lrs() -> Dict[str, float]:
    """Every registered method's tuned comparison rate, where it has one (for --help)."""
    return {m: METHODS[m].learning_rates.comparison for m in method_order()
            if METHODS[m].learning_rates.comparison is not None}


def sweep_grids() -> Dict[str, Tuple[float, ...]]:
    """Every registered method's sweep grid, where it has one."""
    return {m: tuple(METHODS[m].sweep_grid) for m in method_order() if METHODS[m].sweep_grid}
