"""Communication only: layouts, the All-Scan, state all-gathers, ring P2P. Never imports `parallel`."""
from longscan.distributed.all_scan import all_scan, serial_scan
from longscan.distributed.layouts import (LAYOUTS, group_rank_size, num_segments, positions, segment_ids,
                                          segment_owner, shard, unshard)
from longscan.distributed.state_allgather import all_gather_states
