"""A/B probe for `gpu_fig10_nccl.sh overlap-ab`: put back, in the working tree, the cross-process bench's sends as
they were before 2026-11-29 (night): the worker's send blocks its command loop until the transfer completes, and
both processes gather a stage's blocks on their current stream. Run from the repo root; undo with git checkout."""

from pathlib import Path


def patch(path: str, old: str, new: str) -> None:
    p = Path(path)
    text = p.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{path}: the code to replace is not there once")
    p.write_text(text.replace(old, new))


patch("llumnix/bench/worker.py",
      "        with after_current(side):\n            sends.append(channel.isend(ex.read_blocks(block_ids)))\n",
      "        channel.send(ex.read_blocks(block_ids))\n")
patch("llumnix/bench/migration.py",
      "self.side = side_stream(str(local.runner.device)) if to_worker else None",
      "self.side = None")
print("blocking sends, gathers on the current stream")
