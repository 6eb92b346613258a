"""The accuracy benchmark's steps, on the demo's resumable driver (:class:`nnunetv2_dsm.demo.pipeline.Demo`).

Everything runs as the real console commands in subprocesses (``nnUNet_raw/_preprocessed/_results`` inside the
output folder), with the state in ``accuracy_state.json``: re-running with the same ``-o`` skips finished steps and
resumes an interrupted training. Steps, in order: phantom sources (seeded) → ``nnUNetv2_dsm_convert`` →
``nnUNetv2_dsm_merge`` → ``nnUNetv2_plan_and_preprocess`` (merged dataset) → the per-source baseline datasets and
their plans → the nnU-Net learning-rate sweep → the nnU-Net baselines and their predictions → DSM Stage 1 →
prompt embeddings → DSM Stage 2 → DSM predictions (Stage 2 with the held-out prompt and anomaly maps, Stage 1) →
report. DSM comes last so that ``--rerun-dsm`` (after a change to DSM) redoes only DSM and keeps the baselines.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from nnunetv2_dsm.accuracy.baselines import (BASELINE_SOURCES, BASELINE_TRAINER, DEFAULT_LRS,
                                             DEFAULT_SWEEP_SOURCES, SweepRun,
                                             baseline_dataset_id, choose_lr, dataset_name, link_test_images, lr_tag,
                                             manifest_cases, training_summary, write_baseline_dataset)
from nnunetv2_dsm.accuracy.budget import Budget, Schedule
from nnunetv2_dsm.demo.pipeline import CONFIG, DATASET_ID, FOLD, PRESETS, PROMPT_SLUG, Demo, Preset, Step
from nnunetv2_dsm.demo.sources import HELD_OUT_CLASS, SOURCES, absent_tumors, write_source
from nnunetv2_dsm.accuracy.schedule import SCHEDULE_ENV, SEED_ENV

STAGE1_TRAINER, STAGE2_TRAINER = "nnUNetTrainerDSMStage1_accuracy", "nnUNetTrainerDSMStage2_accuracy"
DSM_STEPS = ("stage1", "embed", "stage2", "predict", "predict_stage1", "report")
VARIATION = 0.15          # organ size / position variation of the benchmark's phantom (phantom.make_case)
# parts of the wall-time table: step-name prefix -> part
PARTS = (("sources", "data (phantom, convert, merge, plan)"), ("convert", "data (phantom, convert, merge, plan)"),
         ("merge", "data (phantom, convert, merge, plan)"), ("plan", "data (phantom, convert, merge, plan)"),
         ("baseline_data", "data (phantom, convert, merge, plan)"), ("stage1", "DSM Stage 1 training"),
         ("embed", "DSM Stage 2 training"), ("stage2", "DSM Stage 2 training"), ("sweep_", "nnU-Net lr sweep"),
         ("nnunet_", "nnU-Net baselines training"), ("predict", "prediction (all models)"), ("report", "scoring"))


@dataclass
class AccuracyRun(Demo):
    """One benchmark run in ``output``: ``seed`` draws the phantom, ``budget`` scales every training."""
    title = "DSM accuracy benchmark"
    prog = "scripts/accuracy.py"
    state_file = "accuracy_state.json"
    report_name = "accuracy.md"
    seed: int = 0
    budget: float = 1.0
    sweep_fraction: float = 0.25
    lrs: Tuple[float, ...] = DEFAULT_LRS
    sweep_sources: Tuple[str, ...] = DEFAULT_SWEEP_SOURCES
    dsm_only: bool = False   # data and DSM only: no nnU-Net baseline (their columns stay empty in the report)

    def __post_init__(self):
        super().__post_init__()
        self.plan = Budget(self.budget, self.sweep_fraction)
        demo = PRESETS["default"]
        self.preset = Preset(f"accuracy seed {self.seed} budget {self.budget:g}", demo.shape, demo.spacing,
                             dict(demo.n_cases), STAGE1_TRAINER, STAGE2_TRAINER)
        self.lrs = tuple(sorted(set(float(x) for x in self.lrs)))
        unknown = sorted(set(self.sweep_sources) - set(BASELINE_SOURCES))
        if unknown or not self.sweep_sources:
            raise ValueError(f"sweep sources must be among {BASELINE_SOURCES}, got {list(self.sweep_sources)}")
        self.sweep_sources = tuple(s for s in BASELINE_SOURCES if s in self.sweep_sources)
        self.base = self.output / "baselines"
        self.pred1, self.pred_nnunet = self.output / "predictions_stage1", self.output / "predictions_nnunet"

    def env(self, **extra: str) -> Dict[str, str]:
        """The demo's subprocess environment plus the training seed (``--seed``) of the benchmark's trainers."""
        return super().env(**{SEED_ENV: str(self.seed), **extra})

    # ---- steps ---------------------------------------------------------------------------------------------------
    def steps(self) -> List[Step]:
        """The steps in order (:meth:`_steps`), each recording its CPU time."""
        return [Step(s.name, s.title, self._cpu_timed(s.name, s.run), s.done, s.key) for s in self._steps()]

    def _cpu_timed(self, name: str, run):
        """``run``, recording the CPU seconds of its subprocesses (and of this process) in the step's state: on a
        shared machine wall time depends on the others' load, CPU time much less."""
        def timed() -> None:
            before = _cpu_seconds()
            try:
                run()
            finally:
                self.state.setdefault("steps", {}).setdefault(name, {})["cpu_seconds"] = _cpu_seconds() - before
        return timed

    def _steps(self) -> List[Step]:
        """The demo's data steps, then the benchmark's (see the module docstring)."""
        demo = {s.name: s for s in super().steps()}
        b, p = self.plan, self.preset
        steps = [Step("sources", f"phantom sources (seed {self.seed})", self.do_sources,
                      demo["sources"].done, p.name),
                 demo["convert"], demo["merge"], demo["plan"]]
        if not self.dsm_only:
            steps += self._baseline_steps()
        # DSM last: --rerun-dsm (after a change to DSM) redoes only these
        steps += [self.train_step("stage1", STAGE1_TRAINER, b.stage1), demo["embed"],
                  self.train_step("stage2", STAGE2_TRAINER, b.stage2),
                  Step("predict", demo["predict"].title + " (DSM Stage 2)", self.do_predict,
                       self.predictions_complete),
                  Step("predict_stage1", "nnUNetv2_predict (DSM Stage 1)", self.do_predict_stage1,
                       lambda: self._all_predicted(self.pred1, self.test_cases())),
                  Step("report", "accuracy.json and accuracy.md", self.do_report, lambda: False)]
        return steps

    def _baseline_steps(self) -> List[Step]:
        """The nnU-Net baselines' data, learning-rate sweep, trainings and predictions."""
        b = self.plan
        steps = [Step("baseline_data", "nnU-Net baseline datasets (one per source) + nnUNetv2_plan_and_preprocess",
                      self.do_baseline_data, self.baseline_data_done)]
        if len(self.lrs) > 1:
            steps += [Step(f"sweep_{s}_{lr_tag(lr)}", f"nnU-Net sweep: {s}, lr {lr:g}, {b.sweep.iterations} "
                           f"iterations", lambda s=s, lr=lr: self.do_baseline(s, lr, b.sweep),
                           lambda s=s, lr=lr: self.baseline_done(s, lr, b.sweep), f"{lr:g}:{b.sweep.env()}")
                      for s in self.sweep_sources for lr in self.lrs]
        steps += [Step(f"nnunet_{s}", f"nnU-Net baseline: {s}, {b.nnunet.iterations} iterations at the chosen lr",
                       lambda s=s: self.do_final_baseline(s), lambda s=s: self.final_baseline_done(s),
                       ":".join([b.nnunet.env(), ",".join(map(str, self.lrs)), b.sweep.env(), *self.sweep_sources]))
                  for s in BASELINE_SOURCES]
        steps += [Step("predict_nnunet", "nnUNetv2_predict (each nnU-Net baseline on its source's test cases)",
                       self.do_predict_nnunet, self.nnunet_predictions_complete)]
        return steps

    def forget_dsm(self) -> None:
        """For ``--rerun-dsm``: delete the DSM models and predictions and mark their steps undone, so the next
        :meth:`run` retrains DSM and re-scores while the data and the nnU-Net baselines are kept."""
        import shutil
        state_path = self.output / self.state_file
        if not state_path.is_file():
            return
        self.state = json.loads(state_path.read_text())
        if self.state.get("preset") != self.preset.name:
            return                                           # run() refuses this folder with a message
        for name in DSM_STEPS:
            self.state.get("steps", {}).pop(name, None)
        for folder in (self.trained(STAGE1_TRAINER).parent, self.trained(STAGE2_TRAINER).parent, self.pred,
                       self.pred1):
            shutil.rmtree(folder, ignore_errors=True)
        self._save_state()
        self.echo(f"--rerun-dsm: removed the DSM models and predictions in {self.output}; the data and the nnU-Net "
                  f"baselines are kept")

    def train_step(self, name: str, trainer: str, schedule: Schedule) -> Step:
        key = f"{trainer}:{schedule.env()}"
        return Step(name, f"DSM Stage {name[-1]} training ({trainer}, {schedule.iterations} iterations)",
                    lambda: self.do_train(name, trainer, epochs=schedule.epochs, key=key,
                                          **{SCHEDULE_ENV: schedule.env()}),
                    lambda: (self.trained(trainer) / "checkpoint_final.pth").is_file(), key)

    # ---- data ----------------------------------------------------------------------------------------------------
    def do_sources(self) -> None:
        for name, n in self.preset.n_cases.items():
            files = write_source(name, self.sources_dir / name, n, self.preset.shape, self.preset.spacing,
                                 seed=self.seed, variation=VARIATION)
            self.echo(f"  {name:<5} {len(files)} cases in {self.sources_dir / name}")
        (self.sources_dir / ".complete").write_text(self.preset.name)

    def baseline_dataset(self, source: str) -> Tuple[int, str]:
        i = baseline_dataset_id(SOURCES[source].dataset_id)
        return i, dataset_name(i, source)

    def baseline_data_done(self) -> bool:
        return all((self.pre / self.baseline_dataset(s)[1] / "nnUNetPlans.json").is_file() for s in BASELINE_SOURCES)

    def do_baseline_data(self) -> None:
        for s in BASELINE_SOURCES:
            i, _ = self.baseline_dataset(s)
            out = write_baseline_dataset(self.dataset_dir, self.raw, s, i)
            ds = json.loads((out / "dataset.json").read_text())
            self.echo(f"    {out.name}: {ds['numTraining']} training cases, classes: "
                      f"{', '.join(ds['dsm_baseline']['classes'])}")
        ids = [self.baseline_dataset(s)[0] for s in BASELINE_SOURCES]
        # no --verify_dataset_integrity: it requires consecutive label values, which a source's regions of the DSM
        # encoding are not (write_baseline_dataset checks the values; the merged plan step verified the files)
        self.call("baseline_data", "nnUNetv2_plan_and_preprocess", "-d", *ids, "-c", CONFIG, "-np", "2", "-npfp",
                  "2", nnUNet_n_proc_DA="2")

    # ---- nnU-Net baselines ---------------------------------------------------------------------------------------
    def run_root(self, source: str, lr: float, schedule: Schedule) -> Path:
        """nnUNet_results of one baseline training (one per source, learning rate and length)."""
        return self.base / "runs" / source / f"{lr_tag(lr)}_it{schedule.iterations}"

    def baseline_fold(self, source: str, lr: float, schedule: Schedule) -> Path:
        return self.trained(BASELINE_TRAINER, self.baseline_dataset(source)[1], self.run_root(source, lr, schedule))

    def baseline_done(self, source: str, lr: float, schedule: Schedule) -> bool:
        return (self.baseline_fold(source, lr, schedule) / "checkpoint_final.pth").is_file()

    def do_baseline(self, source: str, lr: float, schedule: Schedule, step: str = "") -> None:
        i, name = self.baseline_dataset(source)
        step = step or f"sweep_{source}_{lr_tag(lr)}"
        self.do_train(step, BASELINE_TRAINER, i, name, results=self.run_root(source, lr, schedule),
                      epochs=schedule.epochs, key=f"{lr:g}:{schedule.env()}", **{SCHEDULE_ENV: schedule.env(lr)})

    def sweep(self, source: str) -> List[SweepRun]:
        """The sweep runs of ``source`` with what they reached (nan where a run did not finish)."""
        b, runs = self.plan, []
        for lr in self.lrs:
            rec = self.state.get("steps", {}).get(f"sweep_{source}_{lr_tag(lr)}", {})
            runs.append(SweepRun(source, lr, b.sweep.iterations, seconds=rec.get("seconds"),
                                 **training_summary(self.baseline_fold(source, lr, b.sweep))))
        return runs

    def swept_as(self, source: str) -> str:
        """The source whose sweep chooses ``source``'s learning rate: itself, or the first swept source."""
        return source if source in self.sweep_sources else self.sweep_sources[0]

    def chosen_lr(self, source: str) -> float:
        return choose_lr(self.sweep(self.swept_as(source))) if len(self.lrs) > 1 else self.lrs[0]

    def final_baseline_done(self, source: str) -> bool:
        try:
            return self.baseline_done(source, self.chosen_lr(source), self.plan.nnunet)
        except RuntimeError:
            return False

    def do_final_baseline(self, source: str) -> None:
        runs = self.sweep(self.swept_as(source)) if len(self.lrs) > 1 else []
        for r in runs:
            self.echo(f"    sweep {source} lr {r.lr:g}: final train loss {r.final_train_loss:.4f}, pseudo Dice "
                      f"{r.final_pseudo_dice:.3f}")
        lr = self.chosen_lr(source)
        self.echo(f"    chosen learning rate for {source}: {lr:g}" +
                  ("" if self.swept_as(source) == source or len(self.lrs) == 1 else
                   f" (by the sweep on {self.swept_as(source)})"))
        if self.baseline_done(source, lr, self.plan.nnunet):
            self.echo("    the sweep's full-length run at this learning rate is the baseline")
            return
        self.do_baseline(source, lr, self.plan.nnunet, step=f"nnunet_{source}")

    # ---- predictions ---------------------------------------------------------------------------------------------
    def subset_cases(self, subset: str, source: str = "") -> List[str]:
        cases = json.loads((self.dataset_dir / "dataset.json").read_text())["dsm_manifest"]["cases"]
        return sorted(c for c, e in cases.items() if e["subset"] == subset and (not source or e["source"] == source))

    @staticmethod
    def _all_predicted(folder: Path, cases: Sequence[str]) -> bool:
        return bool(cases) and all((folder / f"{c}.nii.gz").is_file() for c in cases)

    def _predict(self, step: str, inputs: Path, out: Path, dataset_id: int, trainer: str, **env: str) -> None:
        self.call(step, "nnUNetv2_predict", "-i", inputs, "-o", out, "-d", dataset_id, "-c", CONFIG, "-f", FOLD,
                  "-tr", trainer, "-device", self.device, "-npp", "1", "-nps", "1", "--disable_tta", **env)

    def do_predict_stage1(self) -> None:
        self._predict("predict_stage1", self.dataset_dir / "imagesTs", self.pred1, DATASET_ID, STAGE1_TRAINER)

    def nnunet_predictions_complete(self) -> bool:
        return all(self._all_predicted(self.pred_nnunet / s, self.subset_cases("test", s)) for s in BASELINE_SOURCES)

    def do_predict_nnunet(self) -> None:
        for s in BASELINE_SOURCES:
            inputs = link_test_images(self.dataset_dir, self.subset_cases("test", s), self.base / "inputs" / s)
            root = self.run_root(s, self.chosen_lr(s), self.plan.nnunet)
            self._predict("predict_nnunet", inputs, self.pred_nnunet / s, self.baseline_dataset(s)[0],
                          BASELINE_TRAINER, nnUNet_results=str(root))

    # ---- report --------------------------------------------------------------------------------------------------
    def scoring_inputs(self):
        """Every prediction that exists (a failed part leaves its model out of the tables)."""
        from nnunetv2_dsm.accuracy.scoring import ScoringInputs
        test, inference = self.subset_cases("test"), self.subset_cases("inference")
        cases = json.loads((self.dataset_dir / "dataset.json").read_text())["dsm_manifest"]["cases"]
        ts = self.dataset_dir / "labelsTs"

        def existing(paths: Dict[str, Path]) -> Dict[str, Path]:
            return {c: p for c, p in paths.items() if p.is_file()}
        nnunet = {c: self.pred_nnunet / cases[c]["source"] / f"{c}.nii.gz" for c in test}
        return ScoringInputs(
            reference={c: ts / f"{c}.nii.gz" for c in test + inference},
            annotated={c: cases[c]["annotated"] for c in test + inference}, test_cases=test,
            inference_cases=inference,
            predictions={"nnunet": existing(nnunet),
                         "dsm_stage1": existing({c: self.pred1 / f"{c}.nii.gz" for c in test}),
                         "dsm_stage2": existing({c: self.pred / f"{c}.nii.gz" for c in test})},
            anomaly_maps=existing({c: self.pred / "anomaly_maps" / f"{c}.nii.gz" for c in test + inference}),
            prompt_masks=existing({c: self.pred / "prompts" / PROMPT_SLUG / f"{c}.nii.gz" for c in inference}),
            held_out_class=HELD_OUT_CLASS,
            absent_tumors={c: absent_tumors(cases[c]["source"]) for c in test})

    def wall_times(self, key: str = "seconds") -> Dict[str, float]:
        """Seconds per part of the run (``key``: ``seconds`` wall time, ``cpu_seconds`` CPU time of all processes)."""
        out: Dict[str, float] = {}
        for name, rec in self.state.get("steps", {}).items():
            part = next((p for prefix, p in PARTS if name.startswith(prefix)), name)
            out[part] = out.get(part, 0.0) + float(rec.get(key, 0.0))
        out["total (steps run so far)"] = sum(out.values())
        return out

    def do_report(self) -> None:
        from nnunetv2_dsm.accuracy.report import build_json, write_json, write_markdown
        from nnunetv2_dsm.accuracy.scoring import score
        from nnunetv2_dsm.benchmark.plans import machine_info
        scores = score(self.scoring_inputs())
        sweep: List[SweepRun] = []
        for s in () if self.dsm_only else self.sweep_sources:
            runs = self.sweep(s) if len(self.lrs) > 1 else []
            try:
                choose_lr(runs) if runs else None        # marks the chosen run
            except RuntimeError:
                pass
            sweep += runs
        extra = {"chosen_lr": {s: None if self.dsm_only else self._chosen_or_none(s) for s in BASELINE_SOURCES},
                 "dsm_only": self.dsm_only,
                 "lr_chosen_by_sweep_on": {s: self.swept_as(s) for s in BASELINE_SOURCES},
                 "dsm_lr": "the demo trainers' own (not swept)", "phantom": {
                     "seed": self.seed, "variation": VARIATION, "shape": list(self.preset.shape),
                     "cases": self.preset.n_cases, "test_cases": self.subset_cases("test"),
                     "inference_cases": self.subset_cases("inference")},
                 "clip": self.clip.describe if self.clip else None, "finished": time.strftime("%Y-%m-%d %H:%M")}
        extra["cpu_time_s"] = self.wall_times("cpu_seconds")
        # seeded runs repeat on one machine, not across machines; the load average is read here, at the report, not
        # at the start of the run, so it is left out (the speed benchmark's record keeps it)
        extra["machine"] = {k: v for k, v in machine_info(self.device).items() if k != "loadavg_start"}
        doc = build_json(self.seed, self.budget, self.plan.iterations(), scores, sweep, self.wall_times(), extra)
        write_json(doc, self.output / "accuracy.json")
        notes = [] if not self.clip or self.clip.trained else [
            "", "CLIP: random text tower (no weights on this machine): the prompt DSC is not a zero-shot result."]
        path = write_markdown(doc, self.output / "accuracy.md", notes)
        self.echo(path.read_text())

    def _chosen_or_none(self, source: str):
        try:
            return self.chosen_lr(source)
        except RuntimeError:
            return None


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    import resource
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
