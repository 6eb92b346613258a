"""DSM against nnU-Net's default network on the same plans: training step, peak memory, sliding-window prediction,
the SSM alone, and a profile of the Stage 2 step. The CLI is ``scripts/benchmark.py`` (``main`` here, from ``cli``).

Method (one process, alternating):

* **Plans.** ``--plans FILE -c CONFIG``, or by default realistic plans made by nnU-Net's own ``ExperimentPlanner``
  from a synthetic abdominal-CT fingerprint (100 CT scans of 512×512×300 voxels at 0.8×0.8×1.5 mm, one channel
  "CT") with DSM's dataset.json (45 regions, ``nnunetv2_dsm.labels``) in a temporary ``nnUNet_raw`` /
  ``nnUNet_preprocessed``. ``--patch`` re-plans the topology for another patch with nnU-Net's
  ``get_pool_and_conv_props`` (as the planner does), ``--batch-size`` overrides the batch size, ``--tiny`` narrows
  both the U-Net (8→64 features, one conv per stage) and the DSM decoders (``TINY_ARCHITECTURE``); every network
  is built from the same modified plans.
* **Networks and steps.** The real trainer classes are instantiated (``nnUNetTrainer``, ``nnUNetTrainerDSMStage1``,
  ``nnUNetTrainerDSMStage2``) and set up as ``initialize()`` does (network from ``build_network_architecture``,
  ``configure_optimizers``, ``_build_loss``; no dataset, no torch.compile on either side). The timed step is the
  trainers' own ``train_step`` on a synthetic batch (random image, random 45-region targets at each trainer's deep
  supervision scales, every class annotated): forward, loss, backward, gradient clipping and the optimiser step
  (SGD for nnU-Net, AdamW for DSM). Stage 2 gets random unit CLIP text embeddings and, as in training, its frozen
  Stage 1 teacher (random weights), whose forward pass is part of the Stage 2 step.
* **Timing.** ``--warmup`` untimed rounds, then ``--reps`` rounds; each round runs every network once, the order
  rotating from round to round (A B C, B C A, C A B, ...) so that load from other processes hits all of them.
  Medians are reported, min and max too. CUDA is synchronised around every timed call.
* **Peak memory.** Each network's training step runs in a separate subprocess (``--memory-worker``): RSS before the
  first step (baseline: interpreter, torch, network, optimiser, batch), then two steps (the first allocates the
  optimiser state), then the RSS high-water mark (``VmHWM``; ``ru_maxrss`` where /proc is missing) and, on CUDA,
  ``torch.cuda.max_memory_allocated``. The target is judged on the step's own memory: peak − baseline (CPU) or
  max allocated (CUDA).
* **Prediction.** ``nnUNetPredictor.manual_initialization(network, plans_manager, configuration_manager,
  [state_dict], dataset_json, trainer_name, mirror_axes)`` with the network built for inference (no deep
  supervision, eval), then ``predict_sliding_window_return_logits`` of one random (C, X, Y, Z) volume: step 0.5,
  Gaussian weighting, mirroring off unless ``--mirroring``. Warm-up: one patch forward per network.
* **SSM.** ``VoxelSequenceSSM(25)`` (the organ-query SSM of a kMMM layer) on (2, 25, s, s, s) logits for
  ``--ssm-sizes``: forward without gradient and forward + backward. Its share of a Stage 2 step is measured inside
  the timed Stage 2 steps: forward hooks time the four calls, tensor hooks on their outputs and inputs time their
  backward (from the moment the output gradient is complete to the moment the input gradient is); cross-checked by
  timing the SSM alone at the four in-step shapes.
* **Profile.** One Stage 2 step under ``torch.profiler``: operators by self CPU time, and the same time attributed
  to modules — forward ops by the innermost module they run in, backward ops by the module whose forward op
  created their autograd node (matched by sequence number).

Modules: ``plans`` (constants, machine, plans), ``runner`` (trainers, batches, timing helpers), ``steps`` (training
step, SSM), ``memory`` (subprocess per network; ``__main__`` is its entry point), ``predict``, ``profile``,
``report`` (targets, Markdown), ``cli`` (arguments, ``main``).
"""


def main(argv=None):
    """``cli.main``, imported on call: the package itself stays import-light, so its standalone modules
    (``mamba_build``, ``gpu_check``) run where nnunetv2 does not import."""
    from .cli import main as cli_main
    return cli_main(argv)


__all__ = ["main"]
