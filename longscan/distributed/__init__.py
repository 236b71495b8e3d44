"""Communication only: layouts, the All-Scan, state all-gathers, ring P2P. Never imports `parallel`."""
from longscan.distributed.layouts import (LAYOUTS, group_rank_size, positions, segment_ids, segment_owner,
                                          num_segments, shard, unshard)
