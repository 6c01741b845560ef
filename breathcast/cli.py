"""The ``breathcast`` command line: a thin layer that parses, calls the library and prints.

Bad input ends with a one-line ``breathcast: error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import breathcast
from breathcast.argtypes import int_at_least as _int_at_least
from breathcast.argtypes import positive_float as _positive_float
from breathcast.argtypes import non_negative_float as _non_negative_float
from breathcast.errors import BreathcastError

__all__ = ["main", "build_parser"]

log = logging.getLogger("breathcast")


def _simulation_config(args: argparse.Namespace):
    from breathcast.sim.simulator import SimulationConfig

    return SimulationConfig(grid_size=args.grid, n_scans=args.scans, noise_hu=args.noise_hu, n_tumours=args.tumours)


def _add_simulation_options(parser: argparse.ArgumentParser, scans_default: int = 25) -> None:
    from breathcast.sim.simulator import MIN_GRID_SIZE

    parser.add_argument("--grid", type=_int_at_least(MIN_GRID_SIZE), default=64, metavar="N",
                        help=f"scan grid N x N x N voxels (at least {MIN_GRID_SIZE}; default 64)")
    parser.add_argument("--scans", type=_int_at_least(1), default=scans_default, metavar="K",
                        help=f"fast helical free-breathing scans per patient (default {scans_default})")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same data (default 0)")
    parser.add_argument("--noise-hu", type=_non_negative_float, default=15.0, metavar="HU",
                        help="CT noise standard deviation in HU (default 15)")
    parser.add_argument("--tumours", type=_int_at_least(0), default=1, metavar="T", help="lung tumours per patient (default 1)")


def _cmd_simulate(args: argparse.Namespace) -> int:
    from breathcast.sim.simulator import simulate_dataset

    start = time.perf_counter()
    if args.patients == 0 and not args.anatomy_ct:
        raise BreathcastError("nothing to simulate: give --patients N (cartoon) and/or --anatomy-ct CT (real anatomy)")
    config = _simulation_config(args)
    folders = simulate_dataset(args.out, args.patients, config, seed=args.seed, progress=not args.quiet) if args.patients else []
    if args.anatomy_ct:
        from breathcast.sim.realct import load_anatomy_source, simulate_realct_dataset

        sources = [load_anatomy_source(path) for path in args.anatomy_ct]
        folders += simulate_realct_dataset(args.out, sources, args.patients_per_ct, config, seed=args.seed,
                                           first_index=args.patients, progress=not args.quiet)
    print(f"wrote {len(folders)} patient(s) to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_simulate_4dct(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    import numpy as np

    from breathcast.io.four_dct import write_4dct
    from breathcast.sim.four_dct import FourDCTConfig, simulate_4dct
    from breathcast.sim.realct import load_anatomy_source
    from breathcast.sim.simulator import SimulationConfig

    start = time.perf_counter()
    source = load_anatomy_source(args.anatomy_ct) if args.anatomy_ct else None
    simulation = SimulationConfig(grid_size=args.grid, noise_hu=args.noise_hu, n_tumours=args.tumours)
    config = FourDCTConfig(n_phases=args.phases, simulation=simulation)
    four_dct = simulate_4dct(args.seed, config, source)
    write_4dct(four_dct.images_hu, four_dct.grid, four_dct.phase_percent, args.out, patient_id=four_dct.patient_id,
               orientation=args.orientation)  # fmt: skip
    if args.truth is not None:
        np.savez_compressed(args.truth, fields_voxels=four_dct.fields, amplitude=four_dct.amplitude, rate_per_s=four_dct.rate,
                            phase_percent=four_dct.phase_percent, labels=four_dct.labels,
                            grid=json.dumps(dataclasses.asdict(four_dct.grid)))  # fmt: skip
    print(f"wrote a {args.phases}-phase 4DCT to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from breathcast.io.dataset import prepare_output_dir
    from breathcast.plots import plot_patient_overview
    from breathcast.sim.simulator import save_patient, simulate_patient

    out = prepare_output_dir(args.out)
    start = time.perf_counter()
    patient = simulate_patient(args.seed, _simulation_config(args), patient_id="demo_patient")
    elapsed = time.perf_counter() - start
    save_patient(patient, out / "dataset")
    png = plot_patient_overview(patient, out / "demo_patient.png")
    amplitudes = [float(scan.amplitude.mean()) for scan in patient.scans]
    print(f"simulated {patient.patient_id}: {len(patient.scans)} scans on {patient.grid} in {elapsed:.1f} s")
    print(f"  diaphragm motion {patient.motion.si_amplitude_mm:.1f} mm at amplitude 1; "
          f"scan mean amplitudes {min(amplitudes):.2f} .. {max(amplitudes):.2f}")
    print(f"  dataset: {out / 'dataset'}")
    print(f"  figure:  {png}")
    if args.no_model:
        return 0
    from breathcast.training.inference import DEFAULT_MODEL, default_model, demo_prediction

    model = default_model()
    if model.config.grid != args.grid:
        print(f"the shipped model works on a {model.config.grid}³ grid; run the demo with --grid {model.config.grid} to see it predict")
        return 0
    result = demo_prediction(patient, model, out)
    print(f"shipped cVAE ({DEFAULT_MODEL.parent.name}): scan {result.fixed_scan} predicted from scan {result.moving_scan} and the traces")
    print(f"  masked MSE {result.masked_mse_predicted:.5f} vs {result.masked_mse_no_deformation:.5f} without deformation "
          f"({result.masked_mse_reduction:.0%} lower); field error {result.field_error_mm:.2f} mm in the lungs")
    print(f"  tumour moved {result.true_tumour_motion_mm:.1f} mm; predicted position off by {result.tumour_error_mm:.1f} mm "
          f"({result.tumour_label_error_mm:.1f} mm between label-map centroids); {result.folded_voxels} folded voxels")
    print(f"  figure:  {result.figure}")
    return 0


def _add_run_options(parser: argparse.ArgumentParser, steps: int, val_every: int) -> None:
    """Options every training run has: data, output, grid, length, split, seed, threads, restart."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, metavar="DIR", help="dataset folder (docs/data-format.md)")
    source.add_argument("--simulate", type=_int_at_least(3), metavar="N", help="simulate N patients in memory instead")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (checkpoint, metrics, model)")
    parser.add_argument("--grid", type=int, choices=(32, 64, 96, 128), default=64, help="model grid edge (default 64)")
    parser.add_argument("--steps", type=_int_at_least(1), default=steps, help=f"optimiser steps (default {steps})")
    parser.add_argument("--val-patients", type=_int_at_least(0), default=2, help="validation patients (default 2)")
    parser.add_argument("--test-patients", type=_int_at_least(0), default=0, help="held-out test patients (default 0)")
    parser.add_argument("--val-every", type=_int_at_least(1), default=val_every,
                        help=f"validate and checkpoint every N steps (default {val_every})")
    parser.add_argument("--seed", type=int, default=0, help="seed of batches, noise, weights and simulated patients")
    parser.add_argument("--threads", type=_int_at_least(1), default=None, help="torch threads")
    parser.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _cmd_train_cvae(args: argparse.Namespace) -> int:
    from breathcast.motion_prior import PRIOR_CHANNELS
    from breathcast.training.cvae import CVAEConfig
    from breathcast.training.losses import LossWeights
    from breathcast.training.train import TrainConfig, train

    config = TrainConfig(
        out=args.out,
        data=args.data,
        simulate_patients=args.simulate,
        simulation_seed=args.seed,
        model=CVAEConfig(grid=args.grid, channels=tuple(args.channels), prior_channels=PRIOR_CHANNELS if args.motion_prior else 0,
                         sliding_mask=args.sliding_mask),
        loss=LossWeights(kl=args.kl_weight, smooth=args.smooth_weight, multiscale=not args.single_scale, fov_margin_mm=args.fov_margin,
                        field=args.field_weight),
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_schedule=args.lr_schedule,
        val_patients=args.val_patients,
        test_patients=args.test_patients,
        val_every=args.val_every,
        checkpoint_every=args.val_every,
        seed=args.seed,
        threads=args.threads,
        resume=not args.restart,
        progress=not args.quiet,
    )
    out = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"model, manifest and metrics in {out}")
    return 0


def _data_config(args: argparse.Namespace):
    from breathcast.training.ldm_train import DataConfig

    return DataConfig(data=args.data, val_patients=args.val_patients, test_patients=args.test_patients,
                      simulate_patients=args.simulate or 8, simulation_seed=args.seed)


def _cmd_train_autoencoder(args: argparse.Namespace) -> int:
    from breathcast.training.autoencoder import AutoencoderConfig
    from breathcast.training.ldm_train import AutoencoderTrainConfig, train_autoencoder

    channels = tuple(args.channels)
    config = AutoencoderTrainConfig(
        out=args.out, source=_data_config(args),
        model=AutoencoderConfig(grid=args.grid, channels=channels, latent_channels=args.latent_channels,
                                norm_num_groups=min(channels)),
        steps=args.steps, micro_batch=args.micro_batch, accumulation=args.accumulation, learning_rate=args.lr,
        kl_weight=args.kl_weight, val_every=args.val_every, seed=args.seed, threads=args.threads,
        resume=not args.restart, progress=not args.quiet,
    )  # fmt: skip
    print(f"auto-encoder, manifest and metrics in {train_autoencoder(config)}")
    return 0


def _cmd_train_ldm(args: argparse.Namespace) -> int:
    from breathcast.motion_prior import PRIOR_CHANNELS
    from breathcast.training.ldm import LDMConfig
    from breathcast.training.ldm_train import LDMTrainConfig, train_ldm

    config = LDMTrainConfig(
        out=args.out, autoencoder=args.autoencoder, source=_data_config(args), steps=args.steps,
        model=LDMConfig(prior_channels=PRIOR_CHANNELS if args.motion_prior else 0),
        micro_batch=args.micro_batch, accumulation=args.accumulation, learning_rate=args.lr,
        decoder_lr_scale=args.decoder_lr_scale, image_weight=args.image_weight, smooth_weight=args.smooth_weight,
        fov_margin_mm=args.fov_margin, val_steps=args.val_steps, val_every=args.val_every, seed=args.seed, threads=args.threads,
        resume=not args.restart, progress=not args.quiet,
    )  # fmt: skip
    print(f"LDM, manifest and metrics in {train_ldm(config)}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from breathcast.training.evaluate import evaluate_models, markdown_report

    extra = []
    if args.five_d:  # the composition root adds calibration's predictors; training never imports calibration
        from breathcast.calibration.motion_model import FiveDPredictor, FitSource

        cache = args.five_d_cache or (args.out / "five_d_models")
        extra = [FiveDPredictor(source, data_dir=args.data, cache_dir=cache) for source in (FitSource.GROUND_TRUTH, FitSource.REGISTRATION)]
    result, files = evaluate_models(
        args.model,
        args.data,
        args.out,
        patient_ids=args.patients,
        pairs_per_patient=args.pairs_per_patient,
        seed=args.seed,
        progress=not args.quiet,
        extra_predictors=extra,
        ldm_steps=args.ldm_steps,
    )
    print(markdown_report(result, full=False))
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


def _cmd_calibrate_surrogate(args: argparse.Namespace) -> int:
    from breathcast.calibration.readers import CsvLayout, read_recording
    from breathcast.calibration.report import format_summary, write_calibration
    from breathcast.calibration.surrogate import CalibrationSettings, calibrate_surrogate

    layout = None
    if args.format == "csv" or args.time_column or args.value_columns:
        layout = CsvLayout(
            time_column=args.time_column or "time",
            value_columns=tuple(args.value_columns or ("amplitude",)),
            separator=args.separator,
            decimal=args.decimal,
            time_unit=args.time_unit,
            valid_column=args.valid_column,
            xray_column=args.xray_column,
        )
    recording = read_recording(args.recording, args.format, layout)
    settings = CalibrationSettings(sign=args.sign, track_drift=args.track_drift, min_prominence=args.min_prominence,
                                   min_period_s=args.min_period)  # fmt: skip
    result = calibrate_surrogate(recording, settings)
    written = write_calibration(result, args.out, args.report)
    print(format_summary(result.calibration.summary))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _cmd_calibrate_five_d(args: argparse.Namespace) -> int:
    from breathcast.calibration.motion_model import fit_five_d_dataset_patient

    model, path = fit_five_d_dataset_patient(args.data, args.patient, args.out, args.source, grid_size=args.grid)
    info = model.fitted_from
    print(f"5D model of {model.patient_id} from {model.source}: {info.get('scans')} scans on {model.grid}, "
          f"residual RMS {model.residual_rms_voxels:.3f} voxels")
    registration = info.get("registration")
    if registration:
        print(f"  registration: {registration['seconds_per_pair_mean']:.2f} s per pair (reference scan {model.reference_scan})")
    print(f"wrote {path.parent}")
    return 0


def _cmd_ingest_4dct(args: argparse.Namespace) -> int:
    from breathcast.calibration.four_dct import ingest_4dct

    phases = dict(args.phase) if args.phase else None
    recording = None
    if args.recording is not None:
        from breathcast.calibration.readers import read_recording

        recording = read_recording(args.recording)
    path, data = ingest_4dct(args.input, args.out, args.patient_id, args.grid, phases, args.period, recording)
    states = data.states
    listed = ", ".join(f"{p:g}%: {a:.2f} {b}" for p, a, b in zip(states.phase_percent, states.amplitude, states.branch))
    print(f"{path}: {len(states.amplitude)} phases ({states.amplitude_source}: {listed})")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from breathcast.calibration.ingest import ingest_patient, load_ingest_config

    config = load_ingest_config(args.config, args.out)
    folder = ingest_patient(config)
    print(f"wrote patient {config.patient_id} ({len(config.scans)} scan(s)) to {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``breathcast`` command."""
    parser = argparse.ArgumentParser(
        prog="breathcast",
        description="Real-time respiratory motion prediction for radiotherapy: simulate 5DCT data, "
        "train and run motion models, stream predictions.",
    )
    parser.add_argument("--version", action="version", version=f"breathcast {breathcast.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sim = sub.add_parser(
        "simulate",
        help="write a synthetic 5DCT dataset (scans, per-slice traces, true fields)",
        description="Simulate patients with fast helical free-breathing scans and their ground-truth "
        "motion, and write them in the dataset format of docs/data-format.md.",
    )
    sim.add_argument("--patients", type=_int_at_least(0), required=True, metavar="N", help="number of cartoon patients")
    sim.add_argument("--anatomy-ct", type=Path, action="append", metavar="CT",
                     help="a real thorax CT (DICOM series folder or NIfTI) to build patients on (repeatable; "
                     "breathcast/sim/realct.py); they follow the cartoon patients")
    sim.add_argument("--patients-per-ct", type=_int_at_least(1), default=10, metavar="M",
                     help="real-anatomy patients per --anatomy-ct (default 10)")
    _add_simulation_options(sim)
    sim.add_argument("--out", type=Path, required=True, metavar="DIR", help="dataset folder (created if needed)")
    sim.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sim.set_defaults(run=_cmd_simulate)

    sim4d = sub.add_parser(
        "simulate-4dct",
        help="write a simulated 4DCT as DICOM (one series per phase, 'Gated, 50.0%%'), with its truth",
        description="Simulate one patient's 4DCT (one breathing cycle in phase bins, 0%% end-inhale, 50%% end-exhale) "
        "on a cartoon or a real CT's anatomy and write it as a scanner does: one CT series per phase in one study "
        "and Frame of Reference. --truth saves the true fields (pull-back from end-exhale, model-grid voxels).",
    )
    sim4d.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to create")
    sim4d.add_argument("--phases", type=_int_at_least(3), default=10, metavar="P", help="phase bins (default 10)")
    sim4d.add_argument("--anatomy-ct", type=Path, default=None, metavar="CT", help="a real thorax CT as the anatomy (default: cartoon)")
    sim4d.add_argument("--orientation", default=None, metavar="POSITION", help="store as a patient in this PatientPosition (HFS, FFS, HFP, ...)")
    sim4d.add_argument("--truth", type=Path, default=None, metavar="NPZ", help="write the truth here")
    sim4d.add_argument("--grid", type=_int_at_least(16), default=64, metavar="N", help="grid N³ in the lung-centred box (default 64)")
    sim4d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sim4d.add_argument("--noise-hu", type=_non_negative_float, default=15.0, metavar="HU", help="CT noise, HU (default 15)")
    sim4d.add_argument("--tumours", type=_int_at_least(0), default=1, metavar="T", help="lung tumours (default 1)")
    sim4d.set_defaults(run=_cmd_simulate_4dct)

    demo = sub.add_parser(
        "demo",
        help="the main job on the embedded default: simulate a patient, predict its motion, draw both",
        description="Simulate one patient and write a figure (coronal slices at exhale and inhale, the "
        "breathing trace with each scan's per-slice trace, the true motion); then let the shipped cVAE predict "
        "the most inhaled scan from the most exhaled one and the traces, and compare with the truth.",
    )
    _add_simulation_options(demo)
    demo.add_argument("--out", type=Path, default=Path("demo-output"), metavar="DIR", help="output folder (default demo-output)")
    demo.add_argument("--no-model", action="store_true", help="simulate and draw only; skip the shipped model's prediction")
    demo.set_defaults(run=_cmd_demo)

    train = sub.add_parser("train", help="train a motion model", description="Train a motion model.")
    models = train.add_subparsers(dest="model", metavar="MODEL", required=True)
    cvae = models.add_parser(
        "cvae",
        help="the conditional VAE of the paper (section 2)",
        description="Train the cVAE on pairs of scans of the same patient. Runs alone, or data parallel as "
        "`torchrun --nproc_per_node P -m breathcast.cli train cvae ...` (gloo on CPU, nccl on GPU).",
    )
    source = cvae.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, metavar="DIR", help="dataset folder (docs/data-format.md)")
    source.add_argument("--simulate", type=_int_at_least(3), metavar="N", help="simulate N patients in memory instead")
    cvae.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (checkpoint, metrics, model)")
    cvae.add_argument("--grid", type=int, choices=(32, 64, 96, 128), default=64, help="model grid edge (default 64)")
    cvae.add_argument("--channels", type=_int_at_least(1), nargs=4, default=[16, 32, 32, 48], metavar="C",
                      help="feature channels at 1/2, 1/4, 1/8, 1/16 resolution (default 16 32 32 48; the engine's "
                      "shipped model uses 8 24 32 48, see README)")
    cvae.add_argument("--steps", type=_int_at_least(1), default=5000, help="optimiser steps (default 5000)")
    cvae.add_argument("--batch-size", type=_int_at_least(1), default=4, help="global batch of pairs (default 4)")
    cvae.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4, as the paper)")
    cvae.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                      help="constant (default, as the paper) or cosine: annealed to lr / 100 over --steps")
    cvae.add_argument("--kl-weight", type=_non_negative_float, default=1e-4, help="KL weight (default 1e-4)")
    cvae.add_argument("--smooth-weight", type=_non_negative_float, default=0.01, help="velocity smoothness weight (default 0.01)")
    cvae.add_argument("--single-scale", action="store_true", help="image loss at full resolution only (the paper's)")
    cvae.add_argument("--fov-margin", type=_non_negative_float, default=25.0, metavar="MM",
                      help="no image loss within MM of where a scan's field of view ends along z (default 25; 0: none)")
    cvae.add_argument("--field-weight", type=_non_negative_float, default=0.0,
                      help="weight of the squared end-point error against the simulator's true field (default 0: image loss "
                           "only, the paper's; needs simulated data with true fields)")
    cvae.add_argument("--motion-prior", action="store_true",
                      help="the decoder also sees each scan's anatomical motion prior (breathcast/motion_prior.py; the shipped model does)")
    cvae.add_argument("--sliding-mask", action="store_true",
                      help="train through the sliding mask the engine serves the model with (CVAEConfig.sliding_mask)")
    cvae.add_argument("--val-patients", type=_int_at_least(0), default=2, help="validation patients (default 2)")
    cvae.add_argument("--test-patients", type=_int_at_least(0), default=0, help="held-out test patients (default 0)")
    cvae.add_argument("--val-every", type=_int_at_least(1), default=250, help="validate and checkpoint every N steps")
    cvae.add_argument("--seed", type=int, default=0, help="seed of pairs, noise, weights and simulated patients")
    cvae.add_argument("--threads", type=_int_at_least(1), default=None, help="torch threads per process")
    cvae.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    cvae.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    cvae.set_defaults(run=_cmd_train_cvae)

    autoencoder = models.add_parser(
        "autoencoder",
        help="the LDM's CT auto-encoder with its trace branch (paper section 3.2; train before `train ldm`)",
        description="Train the CT auto-encoder: each scan and its per-slice trace -> a (C, D/4, D/4, D/4) latent "
        "-> both back. Reconstruction + KL, effective batch micro-batch x accumulation.",
    )
    _add_run_options(autoencoder, steps=500, val_every=50)
    autoencoder.add_argument("--channels", type=_int_at_least(1), nargs=3, default=[4, 8, 16], metavar="C",
                             help="AutoencoderKL channels at full, 1/2, 1/4 resolution (default 4 8 16)")
    autoencoder.add_argument("--latent-channels", type=_int_at_least(1), default=4, help="latent channels (default 4)")
    autoencoder.add_argument("--micro-batch", type=_int_at_least(1), default=4, help="scans per pass (default 4)")
    autoencoder.add_argument("--accumulation", type=_int_at_least(1), default=2, help="passes per step (default 2: batch 8)")
    autoencoder.add_argument("--lr", type=_positive_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    autoencoder.add_argument("--kl-weight", type=_non_negative_float, default=1e-9, help="KL weight (default 1e-9: the reconstruction is a mean over voxels, the KL a sum over the latent)")
    autoencoder.set_defaults(run=_cmd_train_autoencoder)

    ldm = models.add_parser(
        "ldm",
        help="the latent diffusion model of the paper (section 3), on a trained auto-encoder",
        description="Train the LDM: the auto-encoder frozen, the pseudo-3D diffusion U-Net (predicting x0) and the "
        "velocity decoder together; AdamW, cosine decay to lr/100, effective batch micro-batch x accumulation.",
    )
    _add_run_options(ldm, steps=500, val_every=50)
    ldm.add_argument("--autoencoder", type=Path, required=True, metavar="PATH",
                     help="autoencoder.pt (or its folder) from `breathcast train autoencoder` on the same split")
    ldm.add_argument("--micro-batch", type=_int_at_least(1), default=8, help="pairs per pass (default 8)")
    ldm.add_argument("--accumulation", type=_int_at_least(1), default=2, help="passes per step (default 2: batch 16)")
    ldm.add_argument("--lr", type=_positive_float, default=1e-4, help="AdamW peak learning rate (default 1e-4, as the paper)")
    ldm.add_argument("--decoder-lr-scale", type=_positive_float, default=0.1,
                     help="learning rate of the pretrained CT decoder relative to --lr (default 0.1)")
    ldm.add_argument("--image-weight", type=_non_negative_float, default=1.0, help="warped-image error weight (default 1)")
    ldm.add_argument("--smooth-weight", type=_non_negative_float, default=0.01, help="velocity smoothness weight (default 0.01)")
    ldm.add_argument("--fov-margin", type=_non_negative_float, default=25.0, metavar="MM",
                     help="no warped-image error within MM of where a scan's field of view ends along z (default 25; 0: none)")
    ldm.add_argument("--val-steps", type=_int_at_least(1), default=10, help="DDIM steps when validating (default 10)")
    ldm.add_argument("--motion-prior", action="store_true",
                     help="the velocity decoder also sees each scan's anatomical motion prior and both traces, as the cVAE's")
    ldm.set_defaults(run=_cmd_train_ldm)

    evaluate = sub.add_parser(
        "evaluate",
        help="the paper's Table 1 and Fig. 5 on held-out patients, plus field and tumour errors",
        description="Compare models with No Deformation on pairs of scans of held-out patients: masked MSE, MSE, "
        "MS-SSIM, folded voxels, time per prediction (Table 1), Dice per bucket (Fig. 5) and, where the data hold "
        "ground truth, the field end-point error and the tumour-centroid error. Writes results.json, results.md, "
        "dice.png and example.png.",
    )
    evaluate.add_argument("--model", type=Path, action="append", required=True, metavar="PATH",
                          help="a model.pt written by `breathcast train cvae` or `train ldm`; repeat to compare several")
    evaluate.add_argument("--data", type=Path, required=True, metavar="DIR", help="dataset folder (docs/data-format.md)")
    evaluate.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder for the results")
    evaluate.add_argument("--patients", nargs="+", metavar="ID",
                          help="patients to evaluate (default: the test split in the manifest.json next to the model, "
                          "when it was trained on --data)")
    evaluate.add_argument("--pairs-per-patient", type=_int_at_least(1), default=10, metavar="N",
                          help="(moving, fixed) scan pairs per patient (default 10)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the pairs (default 0)")
    evaluate.add_argument("--ldm-steps", type=_int_at_least(1), nargs="+", default=[50], metavar="N",
                          help="DDIM steps of each LDM row; several give one row each (default 50, the paper's)")
    evaluate.add_argument("--five-d", action="store_true",
                          help="add the per-patient 5D motion model rows (Low et al.), fitted from the true fields and "
                          "from SimpleITK registrations (minutes per patient)")
    evaluate.add_argument("--five-d-cache", type=Path, default=None, metavar="DIR",
                          help="where fitted 5D models are kept and found again (default OUT/five_d_models)")
    evaluate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=_cmd_evaluate)

    calibrate = sub.add_parser("calibrate", help="calibrate a breathing surrogate, or fit a patient's 5D motion model",
                               description="Calibration: a raw surrogate recording -> the normalised amplitude "
                               "(docs/calibration.md), or the per-patient 5D motion model (docs/five-d-model.md).")
    what = calibrate.add_subparsers(dest="what", metavar="WHAT", required=True)
    surrogate = what.add_parser(
        "surrogate",
        help="raw surrogate recording -> calibration file (amplitude 0 end-exhale, 1 end-inhale) and report",
        description="Read a raw breathing recording (generic CSV, the optical-marker files, Varian RPM .vxp), find "
        "its breath cycles, and write a calibration file that maps a raw sample to the normalised amplitude (the "
        "daemon applies the same function live). Prints period, amplitude, irregularity, drift, cycles, spikes and "
        "dropouts; --report draws them.",
    )
    surrogate.add_argument("recording", type=Path, metavar="RECORDING", help="the raw recording")
    surrogate.add_argument("--out", type=Path, required=True, metavar="JSON", help="calibration file to write")
    surrogate.add_argument("--format", choices=("csv", "marker", "vxp"), default=None, help="recording format (default: guessed)")
    surrogate.add_argument("--report", type=Path, default=None, metavar="PNG", help="also draw the report here")
    surrogate.add_argument("--time-column", default=None, metavar="NAME", help="CSV: the time column (default 'time')")
    surrogate.add_argument("--value-columns", nargs="+", default=None, metavar="NAME",
                           help="CSV: one signal column, or three (x y z) for a marker (default 'amplitude')")
    surrogate.add_argument("--separator", default=None, metavar="CHAR", help="CSV: field separator (default: sniffed)")
    surrogate.add_argument("--decimal", choices=(".", ","), default=".", help="CSV: decimal mark (default '.')")
    surrogate.add_argument("--time-unit", choices=("s", "ms"), default="s", help="CSV: time unit (default s)")
    surrogate.add_argument("--valid-column", default=None, metavar="NAME", help="CSV: a 0/1 validity column")
    surrogate.add_argument("--xray-column", default=None, metavar="NAME", help="CSV: a 0/1 X-ray-on column")
    surrogate.add_argument("--sign", choices=("auto", "+", "-"), default="auto",
                           help="which way is inhale: auto (from the end-exhale dwell), + or - the raw axis")
    surrogate.add_argument("--track-drift", action="store_true", help="remove and track a slow baseline drift")
    surrogate.add_argument("--min-prominence", type=float, default=0.3, metavar="F",
                           help="a breath rises at least F of the 5-95%% range (default 0.3)")
    surrogate.add_argument("--min-period", type=float, default=1.5, metavar="S", help="shortest breathing period, s (default 1.5)")
    surrogate.set_defaults(run=_cmd_calibrate_surrogate)
    five_d = what.add_parser(
        "five-d",
        help="fit a patient's 5D motion model (u = offset + alpha*A + beta*dA/dt per voxel)",
        description="Fit the 5D motion model of Low et al. to one patient of a dataset, from SimpleITK registrations "
        "of its scans to a reference scan or from the simulator's true fields, and write it (coefficients.npz in mm "
        "LPS + manifest.json with sha256) for the engine's linear5d package.",
    )
    five_d.add_argument("--data", type=Path, required=True, metavar="DIR", help="dataset folder (docs/data-format.md)")
    five_d.add_argument("--patient", required=True, metavar="ID", help="patient id in the dataset")
    five_d.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder for the model")
    five_d.add_argument("--source", choices=("registration", "ground-truth"), default="registration",
                        help="fields to fit: SimpleITK registrations (default) or the simulator's truth")
    five_d.add_argument("--grid", type=_int_at_least(8), default=None, metavar="N",
                        help="fit on an N³ grid (default: the scans' own grid)")
    five_d.set_defaults(run=_cmd_calibrate_five_d)
    ingest = sub.add_parser(
        "ingest",
        help="real 5DCT (DICOM free-breathing scans + raw breathing recording) -> a dataset patient",
        description="Read one patient's free-breathing CT series (one DICOM folder per scan, one Frame of Reference "
        "and grid), calibrate the breathing recording, align each scan's slices to it, and write the patient "
        "(kind real) in the dataset format of docs/data-format.md. The manifest (JSON or TOML) lists patient_id, "
        "recording {path, format} and scans [{folder, start_time_s or use_xray_on, direction, rotation_time_s, "
        "pitch, collimation_mm}]; see docs/dicom.md.",
    )
    ingest.add_argument("--config", type=Path, required=True, metavar="MANIFEST", help="ingest manifest (.json or .toml)")
    ingest.add_argument("--out", type=Path, default=None, metavar="DIR", help="dataset folder (default: the manifest's 'out')")
    ingest.set_defaults(run=_cmd_ingest)
    ingest_4dct = sub.add_parser(
        "ingest-4dct",
        help="a patient's 4DCT (one DICOM series per phase) -> a dataset patient of kind 4dct",
        description="Read a 4DCT folder (one CT series per breathing phase, files in sub-folders included; the phase "
        "from --phase, NominalPercentageOfRespiratoryPhase or the SeriesDescription, e.g. 'Gated, 50%'), check one "
        "Frame of Reference, one geometry and no phase missing, resample the phases into the end-exhale phase's "
        "lung-centred model box, measure each phase's amplitude (lung volume) and branch, and write one patient "
        "(kind 4dct, one scan per phase) in the dataset format of docs/data-format.md; see docs/four-dct.md.",
    )
    from breathcast.engine.cli import add_4dct_arguments

    add_4dct_arguments(ingest_4dct)
    ingest_4dct.add_argument("--out", type=Path, required=True, metavar="DIR", help="dataset folder")
    ingest_4dct.set_defaults(run=_cmd_ingest_4dct)

    from breathcast.engine.cli import add_engine_commands
    from breathcast.stream.cli import add_stream_commands

    add_engine_commands(sub)
    add_stream_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 success, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except BreathcastError as exc:
        print(f"breathcast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("breathcast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
