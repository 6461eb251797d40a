"""benchmarks/attention_schedule.py: the makespan model behind the longest-first work order
(issue 28 item 4), checked on cases whose answers are known by hand, then on the issue's
case (causal N=8192, 128x128 tiles, B*H = 32, 132 SMs) from the block map's own counts."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attention_schedule as schedule  # noqa: E402

from fastvlm.ops import AttentionLayout  # noqa: E402


def test_greedy_and_snake_on_hand_cases():
    # 2 slots: 3, 3, 2, 2, 2 in order -> {3, 2, 2} and {3, 2}: 7; longest-first is the same list
    assert schedule.greedy([3, 3, 2, 2, 2], 2) == 7
    # short first leaves the long item last: 1, 1, 4 on 2 slots -> 5; longest first -> 4
    assert schedule.greedy([1, 1, 4], 2) == 5 and schedule.greedy([4, 1, 1], 2) == 4
    # snake over 6 items, 3 programs: 6 5 4 | 3 2 1 -> p0 6+1, p1 5+2, p2 4+3
    assert schedule.snake_loads([6, 5, 4, 3, 2, 1], 3) == [7, 7, 7]


def test_issue_case_from_the_block_map():
    """Causal N=8192 at 128x128: query block i visits i + 1 tiles; 32 heads -> 2048 items, total
    32 * 64 * 65 / 2 = 66560 tiles, 504.24 per SM on 132. The plain grid (each head's rows
    short to long, in launch order) ends at 544; longest-first and persistent within a tile of
    the bound."""
    layout = AttentionLayout.from_lengths([[8192]], 8192)
    counts = schedule.block_counts(layout, 128, 128, columns=False)
    assert counts == [list(range(1, 65))]
    m = schedule.model(counts, heads=32, sms=132, resident=1, per_sm=2, overhead=0.0)
    assert m["items"] == 2048 and abs(m["bound"] - 66560 / 132) < 1e-9
    assert m["plain"] == 544 and m["longest_first"] == 505 and m["persistent"] == 505
