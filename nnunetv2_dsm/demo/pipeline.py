"""The demo's steps: phantom sources → convert → merge → plan/preprocess → Stage 1 → prompt embeddings → Stage 2
→ predict (with the held-out tumor asked for by prompt) → evaluate → report.

Every step but the first and the last runs the real console command as a subprocess, exactly as a user would
(``nnUNet_raw/_preprocessed/_results`` inside the output folder, ``nnUNet_extTrainer`` at the package's trainer
folder). Its output goes to ``logs/NN_<step>.log``; the console gets a header per step with the elapsed time and a
short live summary (one line per training epoch). State is kept in ``demo_state.json``: re-running with the same
``--output`` skips the steps whose outputs are there, resumes an interrupted training with ``--c``, and re-runs
everything after a step that had to run again (e.g. Stage 2 onwards after new CLIP weights).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Dict, List, Optional, Sequence

from nnunetv2_dsm.demo.console import EpochPrinter, clock as _clock, trainer_epochs  # noqa: F401
from nnunetv2_dsm.demo.clip import ClipChoice, choose_clip_weights
from nnunetv2_dsm.demo.sources import HELD_OUT_CLASS, HELD_OUT_PROMPT, SOURCES, write_source
from nnunetv2_dsm.io_utils import atomic_save_json

DATASET_ID, DATASET_NAME, CONFIG, FOLD = 500, "DSMDemo", "3d_fullres", "all"
DATASET = f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
PROMPT_SLUG = re.sub(r"[^a-z0-9]+", "_", HELD_OUT_PROMPT.lower()).strip("_")
STATE_FILE = "demo_state.json"
ENTRY_POINTS = {  # console script -> module:function, used when the script is not on PATH
    "nnUNetv2_dsm_convert": "nnunetv2_dsm.dataset_conversion.cli:convert_main",
    "nnUNetv2_dsm_merge": "nnunetv2_dsm.dataset_conversion.cli:merge_main",
    "nnUNetv2_plan_and_preprocess": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:"
                                    "plan_and_preprocess_entry",
    "nnUNetv2_dsm_embed_prompts": "nnunetv2_dsm.cli.embed_prompts:main",
    "nnUNetv2_train": "nnunetv2.run.run_training:run_training_entry",
    "nnUNetv2_predict": "nnunetv2.inference.predict_from_raw_data:predict_entry_point",
    "nnUNetv2_dsm_predict": "nnunetv2_dsm.cli.predict:main",
    "nnUNetv2_dsm_evaluate": "nnunetv2_dsm.cli.evaluate:main",
}


@dataclass(frozen=True)
class Preset:
    """Size of a demo run: phantom volume, cases per source, the trainers of both stages."""
    name: str
    shape: tuple
    spacing: tuple
    n_cases: Dict[str, int]
    stage1_trainer: str
    stage2_trainer: str


# 64³ voxels: nnU-Net then plans five resolution stages, so the four kMMM layers run at 1/16 .. 1/2 resolution
# (with 48³ it plans four, and the finest kMMM layer scans every voxel: several times slower on a CPU).
PRESETS = {
    "default": Preset("default", (64, 64, 64), (3.0, 3.0, 3.0), {"btcv": 5, "amos": 4, "lits": 5, "kits": 5, "msd": 3},
                      "nnUNetTrainerDSMStage1_demo", "nnUNetTrainerDSMStage2_demo"),
    "quick": Preset("quick", (64, 64, 64), (3.0, 3.0, 3.0), {"btcv": 3, "amos": 2, "lits": 3, "kits": 3, "msd": 2},
                    "nnUNetTrainerDSMStage1_tiny", "nnUNetTrainerDSMStage2_tiny"),
}


class StepFailed(RuntimeError):
    """A step's command failed; the message names its log file."""


@dataclass
class Step:
    """One pipeline step: ``run`` does it, ``done`` checks its outputs, ``key`` identifies its inputs."""
    name: str
    title: str
    run: Callable[[], None]
    done: Callable[[], bool]
    key: str = ""


@dataclass
class Demo:
    """One demo run in ``output`` (see the module docstring). :meth:`run` returns the exit status. Subclasses (the
    accuracy benchmark) reuse the driver with their own :meth:`steps` and the names below."""
    title: ClassVar[str] = "DSM demo"
    prog: ClassVar[str] = "nnUNetv2_dsm_demo"
    state_file: ClassVar[str] = STATE_FILE
    report_name: ClassVar[str] = "report.md"
    output: Path
    clip_weights: Optional[str] = None
    quick: bool = False
    keep_going: bool = False
    device: str = "cpu"
    echo: Callable[[str], None] = field(default=lambda s: print(s, flush=True))

    def __post_init__(self):
        self.output = Path(self.output).resolve()
        self.preset = PRESETS["quick" if self.quick else "default"]
        o = self.output
        self.raw, self.pre, self.res = o / "nnUNet_raw", o / "nnUNet_preprocessed", o / "nnUNet_results"
        self.sources_dir, self.logs, self.pred = o / "sources", o / "logs", o / "predictions"
        self.eval_dir = o / "evaluation"
        self.state: dict = {}
        self._previous: dict = {}
        self.clip: Optional[ClipChoice] = None
        self._t0 = time.time()

    # ---- environment and commands ------------------------------------------------------------------------------
    def env(self, **extra: str) -> Dict[str, str]:
        """The subprocess environment: nnU-Net folders inside the output, the DSM trainers, CPU-friendly settings."""
        from nnunetv2_dsm.nnunet_ext import EXT_TRAINER_DIR
        env = dict(os.environ)
        ext = [EXT_TRAINER_DIR] + [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep)
                                   if p and os.path.abspath(p) != EXT_TRAINER_DIR]
        env.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre), nnUNet_results=str(self.res),
                   nnUNet_extTrainer=os.pathsep.join(ext), nnUNet_n_proc_DA="0", nnUNet_def_n_proc="2",
                   nnUNet_compile="0", PYTHONUNBUFFERED="1",
                   PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
        env.update(extra)
        return env

    def command(self, name: str, *args) -> List[str]:
        """argv of a console script (its module when the script is not on PATH)."""
        exe = shutil.which(name, path=self.env()["PATH"])
        if exe:
            return [exe, *map(str, args)]
        module, func = ENTRY_POINTS[name].split(":")
        return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; "
                                      f"sys.exit({func}())", *map(str, args)]

    def call(self, step: str, name: str, *args, live: Optional[Callable[[str], None]] = None, **env) -> str:
        """Run console script ``name`` with ``args``, appending its output to the step's log; ``live`` sees every
        line. Returns the output; raises :class:`StepFailed` with the log's tail on a non-zero exit."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path, argv = self.log_path(step), self.command(name, *args)
        shown = shlex.join([name, *map(str, args)])
        self.echo(f"  $ {shown}")
        lines: List[str] = []
        with open(log_path, "a", encoding="utf-8", buffering=1) as log:
            log.write(f"\n$ {shown}\n")
            log.flush()
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env(**env),
                                    text=True, errors="replace", bufsize=1)
            try:
                for line in proc.stdout:
                    log.write(line)
                    lines.append(line)
                    if live:
                        live(line.rstrip("\n"))
                rc = proc.wait()
            except BaseException:
                proc.terminate()
                proc.wait()
                raise
        if rc != 0:
            tail = "".join(lines[-15:])
            raise StepFailed(f"{name} exited with status {rc}. Last lines (full log: {log_path}):\n{tail}")
        return "".join(lines)

    def log_path(self, step: str) -> Path:
        names = [s.name for s in self.steps()]
        return self.logs / f"{names.index(step) + 1:02d}_{step}.log"

    # ---- paths -------------------------------------------------------------------------------------------------
    @property
    def dataset_dir(self) -> Path:
        return self.raw / DATASET

    def case_subsets(self) -> Dict[str, str]:
        """case id -> subset, from the merged dataset.json's manifest."""
        js = json.loads((self.dataset_dir / "dataset.json").read_text())
        return {c: e["subset"] for c, e in js["dsm_manifest"]["cases"].items()}

    def trained(self, trainer: str, dataset: str = DATASET, results: Optional[Path] = None) -> Path:
        return Path(results or self.res) / dataset / f"{trainer}__nnUNetPlans__{CONFIG}" / f"fold_{FOLD}"

    def test_cases(self) -> List[str]:
        return sorted(p.name[:-len("_0000.nii.gz")] for p in (self.dataset_dir / "imagesTs").glob("*_0000.nii.gz"))

    # ---- steps -------------------------------------------------------------------------------------------------
    def steps(self) -> List[Step]:
        """The steps in order."""
        p = self.preset
        return [
            Step("sources", "phantom source datasets in their distributed layouts", self.do_sources,
                 lambda: (self.sources_dir / ".complete").is_file(), p.name),
            Step("convert", "nnUNetv2_dsm_convert, one per source", self.do_convert,
                 lambda: all(next(self.raw.glob(f"Dataset{s.dataset_id}_*/dataset.json"), None) for s in
                             SOURCES.values())),
            Step("merge", "nnUNetv2_dsm_merge (40/60 train/test split; MSD = zero-shot inference set)",
                 self.do_merge, lambda: (self.dataset_dir / "dataset.json").is_file()),
            Step("plan", "nnUNetv2_plan_and_preprocess", self.do_plan,
                 lambda: (self.pre / DATASET / "nnUNetPlans.json").is_file() and
                 len(list((self.pre / DATASET / f"nnUNetPlans_{CONFIG}").glob("*.pkl"))) ==
                 len(list((self.dataset_dir / "labelsTr").glob("*.nii.gz")))),
            Step("stage1", f"Stage 1 training ({p.stage1_trainer})", lambda: self.do_train("stage1", p.stage1_trainer),
                 lambda: (self.trained(p.stage1_trainer) / "checkpoint_final.pth").is_file(), p.stage1_trainer),
            Step("embed", "nnUNetv2_dsm_embed_prompts (CLIP text embeddings)", self.do_embed,
                 lambda: (self.pre / DATASET / "dsm_text_embeddings.pt").is_file(), getattr(self.clip, "weights_id", "")),
            Step("stage2", f"Stage 2 training ({p.stage2_trainer})", lambda: self.do_train("stage2", p.stage2_trainer),
                 lambda: (self.trained(p.stage2_trainer) / "checkpoint_final.pth").is_file(), p.stage2_trainer),
            Step("predict", f"nnUNetv2_dsm_predict with --prompts \"{HELD_OUT_PROMPT}\"", self.do_predict,
                 self.predictions_complete),
            Step("evaluate", "nnUNetv2_dsm_evaluate (DSC, AUROC, FPR95)", self.do_evaluate,
                 lambda: all((self.eval_dir / n / "summary.json").is_file() for n in ("test", "inference", "prompt"))),
            Step("report", "report.md with the metrics table and PNG overlays", self.do_report, lambda: False),
        ]

    def do_sources(self) -> None:
        for name, n in self.preset.n_cases.items():
            files = write_source(name, self.sources_dir / name, n, self.preset.shape, self.preset.spacing)
            self.echo(f"  {name:<5} {len(files)} cases in {self.sources_dir / name}")
        (self.sources_dir / ".complete").write_text(self.preset.name)

    def do_convert(self) -> None:
        for name, spec in SOURCES.items():
            out = self.call("convert", "nnUNetv2_dsm_convert", name, self.sources_dir / name, "-d", spec.dataset_id,
                            "--no-progress")
            self.echo("    " + next((ln for ln in out.splitlines() if "written" in ln.lower()), "converted").strip())

    def do_merge(self) -> None:
        ids = [str(s.dataset_id) for s in SOURCES.values()]
        out = self.call("merge", "nnUNetv2_dsm_merge", "-d", DATASET_ID, "-i", *ids, "--name", DATASET_NAME,
                        "--seed", "0")
        self.echo("\n".join("    " + ln for ln in out.strip().splitlines()[1:-1]))

    def do_plan(self) -> None:
        # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): 0 would break it
        self.call("plan", "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", CONFIG, "-np", "2", "-npfp", "2",
                  "--verify_dataset_integrity", nnUNet_n_proc_DA="2")
        plans = json.loads((self.pre / DATASET / "nnUNetPlans.json").read_text())["configurations"][CONFIG]
        self.echo(f"    patch {plans['patch_size']}, batch {plans['batch_size']}, spacing {plans['spacing']}, "
                  f"{plans['architecture']['arch_kwargs']['n_stages']} resolution stages")

    def do_embed(self) -> None:
        if not self.clip.trained:
            self.echo(self.clip.warning(indent="  "))
        self.call("embed", "nnUNetv2_dsm_embed_prompts", "-d", DATASET_ID, *self.clip.args, "--force",
                  "--extra-prompts", HELD_OUT_PROMPT)

    def do_train(self, step: str, trainer: str, dataset_id: int = DATASET_ID, dataset: str = DATASET,
                 results: Optional[Path] = None, epochs: Optional[int] = None, key: Optional[str] = None,
                 **env: str) -> None:
        """``nnUNetv2_train`` of ``trainer`` on ``dataset_id`` (``results``: another nnUNet_results folder; ``env``:
        extra environment variables; ``key``: the step key an interrupted run of it was recorded with)."""
        folder = self.trained(trainer, dataset, results)
        resume = self._previous.get("status") == "running" and self._previous.get("key") == (key or trainer) and \
            (folder / "checkpoint_latest.pth").is_file()
        if resume:
            self.echo("    resuming the interrupted training from checkpoint_latest.pth (--c)")
        if results is not None:
            env["nnUNet_results"] = str(results)
        self.call(step, "nnUNetv2_train", dataset_id, CONFIG, FOLD, "-tr", trainer, "-device", self.device,
                  *(["--c"] if resume else []), live=EpochPrinter(self.echo, epochs or trainer_epochs(trainer)),
                  **env)

    def predictions_complete(self) -> bool:
        cases = self.test_cases()
        return bool(cases) and all((self.pred / f"{c}.nii.gz").is_file() and
                                   (self.pred / "anomaly_maps" / f"{c}.nii.gz").is_file() and
                                   (self.pred / "prompts" / PROMPT_SLUG / f"{c}.nii.gz").is_file() for c in cases)

    def do_predict(self) -> None:
        n = len(self.test_cases())
        count = [0]

        def live(line: str) -> None:
            if line.lower().startswith("predicting"):
                count[0] += 1
                self.echo(f"    {line.strip()}  ({count[0]}/{n})")
        self.call("predict", "nnUNetv2_dsm_predict", "-i", self.dataset_dir / "imagesTs", "-o", self.pred, "-d",
                  DATASET_ID, "-c", CONFIG, "-f", FOLD, "-tr", self.preset.stage2_trainer, "-device", self.device,
                  "-npp", "1", "--prompts", HELD_OUT_PROMPT, "--save-anomaly-maps", live=live)

    def do_evaluate(self) -> None:
        from nnunetv2_dsm.demo.report import write_prompt_labels
        subsets = self.case_subsets()
        for subset in ("test", "inference"):
            ref = self.eval_dir / "reference" / subset
            shutil.rmtree(ref, ignore_errors=True)
            ref.mkdir(parents=True)
            for case, s in subsets.items():
                if s == subset:
                    shutil.copyfile(self.dataset_dir / "labelsTs" / f"{case}.nii.gz", ref / f"{case}.nii.gz")
        inference = sorted(c for c, s in subsets.items() if s == "inference")
        write_prompt_labels(self.pred / "prompts" / PROMPT_SLUG, self.eval_dir / "prompt_labels", inference,
                            HELD_OUT_CLASS)
        common = ["--anomaly-maps", self.pred / "anomaly_maps", "-dj", self.dataset_dir / "dataset.json",
                  "--region", "host", "-np", "1"]
        for name, ref, pred, extra in (("test", "test", self.pred, []), ("inference", "inference", self.pred, []),
                                       ("prompt", "inference", self.eval_dir / "prompt_labels",
                                        ["--classes", HELD_OUT_CLASS])):
            out = self.call("evaluate", "nnUNetv2_dsm_evaluate", "-ref", self.eval_dir / "reference" / ref, "-pred",
                            pred, *common, "-o", self.eval_dir / name, *extra)
            if name == "test":
                self.echo("\n".join("    " + ln for ln in out.splitlines() if "|" in ln or "-+-" in ln))

    def do_report(self) -> None:
        from nnunetv2_dsm.demo.report import collect_and_write, load_summaries, metrics_tables
        path = collect_and_write(self)
        tables = metrics_tables(load_summaries(self.eval_dir), HELD_OUT_CLASS, HELD_OUT_PROMPT)
        self.echo("\n".join("    " + ln for ln in tables.splitlines() if ln.startswith(("|", "###"))))
        self.echo(f"  wrote {path}")

    # ---- driver ------------------------------------------------------------------------------------------------
    def _save_state(self) -> None:
        atomic_save_json(self.output / self.state_file, self.state, indent=1)

    def run(self) -> int:
        """Run (or resume) every step; returns 0 when all succeeded, 1 otherwise (130 when interrupted)."""
        state_path = self.output / self.state_file
        self.state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        if self.state.get("preset", self.preset.name) != self.preset.name:
            self.echo(f"{self.prog}: error: {self.output} holds a '{self.state['preset']}' run; this is a "
                      f"'{self.preset.name}' run. Use another --output, or delete that folder.")
            return 2
        self.clip = choose_clip_weights(self.clip_weights)
        self.state.update(preset=self.preset.name, preset_settings=asdict(self.preset), device=self.device,
                          clip=asdict(self.clip), started=self.state.get("started", time.strftime("%Y-%m-%d %H:%M")))
        self.state.setdefault("steps", {})
        self.echo(f"{self.title} ({self.preset.name} settings) in {self.output}\n  CLIP weights: {self.clip.describe}")
        steps, rerun, failed = self.steps(), False, []
        for i, step in enumerate(steps, 1):
            rec = self.state["steps"].get(step.name, {})
            header = f"[{i:2d}/{len(steps)}] {step.title}"
            if not rerun and rec.get("status") == "done" and rec.get("key") == step.key and step.done():
                self.echo(f"{header}  -- done earlier ({rec.get('seconds', 0):.0f} s), skipped")
                continue
            if failed and not self.keep_going and step.name != "report":
                self.state["steps"][step.name] = {"status": "not run", "key": step.key}
                continue
            rerun = rerun or step.name != "report"
            self.echo(f"{header}  (t+{_clock(time.time() - self._t0)})")
            self._previous = rec                  # an interrupted training resumes (do_train)
            self.state["steps"][step.name] = {"status": "running", "key": step.key}
            self.state["steps"].update({s.name: {"status": "pending"} for s in steps[i:]
                                        if s.name in self.state["steps"]})
            self._save_state()
            t = time.time()
            try:
                step.run()
                status = "done"
            except KeyboardInterrupt:
                self.state["steps"][step.name].update(seconds=time.time() - t)
                self._save_state()
                self.echo(f"\ninterrupted during '{step.name}'. Run the same command again to resume.")
                return 130
            except Exception as e:  # noqa: BLE001 -- reported, the run goes on to the report
                status = "failed"
                failed.append(step.name)
                self.state["steps"][step.name]["error"] = str(e)
                self.echo(f"  FAILED: {e}")
            self.state["steps"][step.name].update(status=status, seconds=time.time() - t)
            self._save_state()
            self.echo(f"  {status} in {_clock(time.time() - t)}")
        self.echo(f"\n{self.title} finished in {_clock(time.time() - self._t0)}"
                  + (f" with failed steps: {', '.join(failed)}" if failed else "") + f"\n  report: "
                  f"{self.output / self.report_name}")
        if not self.clip.trained:
            self.echo(self.clip.warning())
        return 1 if failed else 0
