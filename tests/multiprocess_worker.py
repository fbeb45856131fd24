"""One process of the 2-process test in test_parallel.py (not collected by pytest).

usage: multiprocess_worker.py OUT_DIR NUM_PROCESSES PROCESS_ID PORT
Runs the tiny DeML train step with pmap over this process's 2 CPU devices as
part of a jax.distributed job on loopback, then writes its parameters.
"""

import os
import sys

import jax

out_dir, num_processes, process_id, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                           num_processes=num_processes, process_id=process_id)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import test_parallel as tp  # noqa: E402

local = jax.local_device_count()
batches = [{k: v[process_id * local:(process_id + 1) * local] for k, v in b.items()}
           for b in tp.synthetic_batches(num_processes * local, 4, tp.STEPS)]
state, _ = tp.run_steps(tp.parity_config(loss_scope="device"), batches, jax.local_devices())
np.savez(os.path.join(out_dir, f"params_p{process_id}.npz"), **tp.flatten_tree(state["params"]))
jax.distributed.shutdown()
