import json

import pytest

from openmoe.config import preset
from openmoe.metrics import MetricsWriter, main, read_metrics
from openmoe.parallel.sizes import resolve_sizes, zero_step_options
from openmoe.train.config import RunConfig, parse_args


def test_metrics_jsonl_and_png(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=False)
    for step in range(1, 4):
        w.log(step, {"loss": 3.0 / step, "ce_loss": 2.5 / step, "z_loss": 0.4, "aux_loss": 0.02, "router_z_loss": 1e-4,
                     "tokens_per_expert": [[10, 0, 5, 5], [1, 2, 3, 14]]})
    w.close()
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] == 1.5
    main([str(tmp_path), "--out", str(tmp_path / "m.png")])
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no metrics records"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "metrics.jsonl").write_text("")
        main([str(tmp_path / "empty")])


def sizes(world, **kw):
    return resolve_sizes(RunConfig.from_flat(**kw), preset("tiny"), world)


def test_plugin_table():
    assert (sizes(2, plugin="ep").ep, sizes(2, plugin="ep").moe_dp) == (2, 1)
    s = sizes(4, plugin="ep_zero", extra_dp_size=2)
    assert (s.ep, s.moe_dp, s.dp, s.pp) == (2, 2, 4, 1)
    s = sizes(4, plugin="hybrid", pp_size=2, ep_size=2)
    assert (s.ep, s.moe_dp, s.dp, s.pp) == (2, 1, 2, 2)


@pytest.mark.parametrize("world,kw,message", [
    (8, dict(plugin="ep"), r"num_experts \(4\) must be divisible by ep_size \(8\)"),
    (2, dict(plugin="ep_zero", extra_dp_size=3), r"world size \(2\) must be divisible by extra_dp_size \(3\)"),
    (4, dict(plugin="hybrid", pp_size=3, ep_size=2), r"world size \(4\) must be divisible by pp_size \(3\) \* ep_size"),
    (2, dict(plugin="hybrid"), r"--plugin hybrid needs --ep_size"),
    (2, dict(plugin="ep", pp_size=2), r"pp_size \(2\) > 1 needs --plugin hybrid"),
    (2, dict(plugin="ep", ep_size=4), r"--ep_size 4 contradicts --plugin ep on 2 ranks, which implies ep_size 2"),
    (2, dict(plugin="ep", tp_size=2), r"tensor/sequence parallelism is not supported"),
    (2, dict(plugin="ep", precision="fp32"), r"zero_stage 1 needs --precision bf16 or fp16"),
    (2, dict(plugin="ep", zero_stage=0), r"needs zero_stage >= 1"),
    (2, dict(plugin="ep", zero_stage=3), r"zero_stage \(3\) must be 0, 1 or 2"),
])
def test_bad_sizes_name_the_numbers(world, kw, message):
    with pytest.raises(ValueError, match=message):
        sizes(world, **kw)


def test_zero2_and_overlap_communication_are_accepted_where_they_take_effect():
    """ZeRO-2 with expert parallelism is built as asked (no downgrade: tests/parallel/test_zero2.py); overlap of ZeRO's
    reduction needs ZeRO and no pipeline, where ColossalAI reduces once after the schedule."""
    assert sizes(2, plugin="ep", zero_stage=2).ep == 2
    assert sizes(2, plugin="ep_zero", extra_dp_size=2, zero_stage=2).moe_dp == 2

    def with_overlap(world, **kw):
        run = RunConfig.from_flat(**kw)
        run.parallel.overlap_communication = True
        return resolve_sizes(run, preset("tiny"), world)

    assert with_overlap(2, plugin="ep", zero_stage=1).ep == 2
    with pytest.raises(ValueError, match=r"--overlap_communication .* needs zero_stage >= 1 \(got 0\)"):
        with_overlap(2, plugin="ep_zero", extra_dp_size=2, zero_stage=0)
    with pytest.raises(ValueError, match=r"--overlap_communication .* no pipeline \(pp_size 2"):
        with_overlap(4, plugin="hybrid", pp_size=2, ep_size=2)


def zero_step(world: int, *argv: str, own_optimizer: bool = True) -> tuple[bool, bool]:
    """(lean_zero, adamw_kernel) as build decides them for this command line on `world` ranks."""
    run = parse_args(list(argv))
    pp = resolve_sizes(run, preset("tiny"), world).pp  # validates an explicit flag too
    options = zero_step_options(run, pp, own_optimizer)
    return options["lean_zero"], options["adamw_kernel"]


SUPPORTED = [(2, ["--plugin", "ep"]), (4, ["--plugin", "ep_zero", "--extra_dp_size", "2"]),
             (4, ["--plugin", "hybrid", "--ep_size", "2"])]
UNSUPPORTED = [(2, ["--plugin", "ep", "--zero_stage", "2"], r"zero_stage 1 \(got 2\)"),
               (2, ["--plugin", "ep_zero", "--extra_dp_size", "2", "--zero_stage", "0"], r"zero_stage 1 \(got 0\)"),
               (2, ["--plugin", "ep", "--overlap_communication"], r"no --overlap_communication \(got True\)"),
               (4, ["--plugin", "hybrid", "--ep_size", "2", "--pp_size", "2"], r"no pipeline \(pp_size 2\)")]


def test_lean_zero_and_adamw_kernel_are_on_by_default_where_supported():
    assert RunConfig().parallel.lean_zero is None and RunConfig().kernels.adamw_kernel is None  # auto
    for world, argv in SUPPORTED:
        assert zero_step(world, *argv) == (True, True), argv
        # explicit flags: the same; explicit off wins over auto
        assert zero_step(world, *argv, "--lean_zero", "--adamw_kernel") == (True, True), argv
        assert zero_step(world, *argv, "--no-adamw_kernel") == (True, False), argv
        assert zero_step(world, *argv, "--lean_zero", "--no-adamw_kernel") == (True, False), argv
        assert zero_step(world, *argv, "--no-lean_zero") == (False, False), argv
        with pytest.raises(ValueError, match=r"^--adamw_kernel is part of --lean_zero's optimizer step; drop "
                                             r"--no-lean_zero, or drop --adamw_kernel$"):
            zero_step(world, *argv, "--no-lean_zero", "--adamw_kernel")
        # a caller's optimizer (build's make_optimizer): the AdamW pass only when asked for
        assert zero_step(world, *argv, own_optimizer=False) == (True, False), argv
        assert zero_step(world, *argv, "--adamw_kernel", own_optimizer=False) == (True, True), argv
    for world, argv, why in UNSUPPORTED:
        assert zero_step(world, *argv) == (False, False), argv
        assert zero_step(world, *argv, "--no-lean_zero", "--no-adamw_kernel") == (False, False), argv
        with pytest.raises(ValueError, match=r"^--lean_zero replaces ZeRO-1's .* needs .*" + why):
            zero_step(world, *argv, "--lean_zero")
        with pytest.raises(ValueError, match=r"^--adamw_kernel is part of --lean_zero's optimizer step; that needs "
                                             r".*" + why + r".*, or drop --adamw_kernel$"):
            zero_step(world, *argv, "--adamw_kernel")
    # programmatic runs (benchmark/train_bench.py's baseline rows): False is off, not auto
    run = RunConfig.from_flat(plugin="ep", lean_zero=False, adamw_kernel=False)
    assert zero_step_options(run, 1) == {"lean_zero": False, "adamw_kernel": False}
    assert zero_step_options(RunConfig.from_flat(plugin="ep", lean_zero=True), 1)["adamw_kernel"]


def test_adamw_kernel_default_is_off_on_cuda_without_triton(monkeypatch):
    """On CUDA the AdamW pass is a Triton kernel: without triton auto means off (torch's fused AdamW), not an error.
    The torch path runs on the CPU, with or without triton."""
    import torch

    from openmoe import optim_kernels

    for cuda, triton, kernel in ((True, False, False), (True, True, True), (False, False, True)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(optim_kernels, "HAS_TRITON", triton)
        assert zero_step(2, "--plugin", "ep") == (True, kernel), (cuda, triton)


def test_resume_reports_the_resolved_zero_step_options():
    """A checkpoint saved before the default changed (False) and resumed with the default (resolved True): a listed
    change, not a refused one (the optimizer state is colossalai's layout either way)."""
    from openmoe.train.checkpointing import changed_options

    saved = RunConfig.from_flat(lean_zero=False, adamw_kernel=False).to_dict()
    now = RunConfig.from_flat(**zero_step_options(RunConfig(), 1))
    assert changed_options(saved, now, "ck") == ["--lean_zero False -> True", "--adamw_kernel False -> True"]


def test_incompatible_flags_are_never_silently_ignored():
    with pytest.raises(ValueError, match=r"--comm_overlap \(-1\) must be >= 0"):
        sizes(2, plugin="ep", comm_overlap=-1)
    with pytest.raises(ValueError, match="--comm_overlap works with capacity routing and the flat all-to-all"):
        sizes(2, plugin="ep", comm_overlap=2, dropless=True)
    with pytest.raises(ValueError, match="--hierarchical_alltoall needs equal splits"):
        sizes(2, plugin="ep", hierarchical_alltoall=True, dropless=True)
    with pytest.raises(ValueError, match=r"--balance_mode bias is not supported with pipeline parallelism yet"):
        sizes(4, plugin="hybrid", pp_size=2, ep_size=2, balance_mode="bias")
    assert sizes(2, plugin="ep", comm_overlap=2).ep == 2 and sizes(2, plugin="ep", balance_mode="bias").ep == 2


def test_config_file_and_cli_precedence(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"lr": 0.5, "plugin": "ep_zero", "extra_dp_size": 2}))
    run = parse_args(["--config", str(f), "--lr", "0.1"])
    assert (run.optim.lr, run.parallel.plugin, run.parallel.extra_dp_size) == (0.1, "ep_zero", 2)
    f.write_text(json.dumps({"learning_rate": 0.5}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]"):
        parse_args(["--config", str(f)])
    with pytest.raises(ValueError, match=r"--plugin 'tp' is not supported; accepted: \['ep', 'ep_zero', 'hybrid'\]"):
        RunConfig.from_flat(plugin="tp")


def test_more_processes_than_gpus_is_refused():
    from openmoe.backend.colossal import check_gpus_per_node

    check_gpus_per_node(2, 2)
    check_gpus_per_node(4, 0)  # CPU: gloo processes, no GPUs to share
    with pytest.raises(ValueError, match=r"--nproc_per_node 4 exceeds the 2 GPU\(s\) on this node; "
                                         r"accepted: at most 2"):
        check_gpus_per_node(4, 2)


def test_output_path_and_max_length_are_checked_before_training(tmp_path):
    from openmoe.train.builder import check_output_path, model_config

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"--output_path .*a_file/run is not writable"):
        check_output_path(str(blocker / "run"))
    check_output_path(str(tmp_path / "fine"))
    with pytest.raises(ValueError, match=r"--max_length \(4096\) exceeds the model's max_position_embeddings \(512\)"):
        model_config(RunConfig.from_flat(max_length=4096))


def test_wandb_offline_run_holds_the_logged_scalars(tmp_path, monkeypatch):
    """--wandb PROJECT with WANDB_MODE=offline (no network): the run is written under output_path/wandb with the
    project, the logged scalar values and the run config; list-valued records (per-expert counts) stay in JSONL."""
    import glob
    import time

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = MetricsWriter(str(tmp_path), tensorboard=False, wandb_project="openmoe-ci",
                           run_config={"optim": {"lr": 0.00123}})
    writer.log(1, {"loss": 7.25, "tokens_per_expert": [[3, 5]]})
    writer.log(2, {"loss": 6.5})
    writer.close()
    (run,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    deadline = time.monotonic() + 60  # wandb's service process may still be flushing the file after finish()
    while b"6.5" not in (data := open(run, "rb").read()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for needle in (b"openmoe-ci", b"loss", b"7.25", b"6.5", b"0.00123"):
        assert needle in data, needle
    assert b"tokens_per_expert" not in data
    assert [r["loss"] for r in read_metrics(str(tmp_path))] == [7.25, 6.5]


def test_png_with_eval_and_rebalance_only_records(tmp_path):
    """Records that carry only the eval loss (an eval on a step that logged nothing else) or only a rebalance report
    are plotted beside the step records (the loss-part plot once assumed every record had every key)."""
    from openmoe.metrics import render

    records = [{"step": 1, "loss": 3.0, "ce_loss": 2.5}, {"step": 2, "eval_loss": 2.7, "eval_ppl": 14.9},
               {"step": 3, "expert_swaps": 1}, {"step": 4, "loss": 2.0, "ce_loss": 1.8, "eval_loss": 2.2}]
    lines = []
    import matplotlib.axes

    plot = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        lines.append((kwargs.get("label"), list(args[0]), list(args[1])))
        return plot(self, *args, **kwargs)

    matplotlib.axes.Axes.plot = spy
    try:
        render(records, str(tmp_path / "m.png"))
    finally:
        matplotlib.axes.Axes.plot = plot
    assert ("eval_loss", [2, 4], [2.7, 2.2]) in lines and ("loss", [1, 4], [3.0, 2.0]) in lines


def test_offload_optimizer_is_checked_with_the_layout():
    """--offload_optimizer is ColossalAI's ZeRO cpu_offload: it needs ZeRO, no pipeline, and no expert moves (those
    exchange masters and moments over the GPUs' collectives); the lean step runs with it (auto), the AdamW kernel
    (a device kernel) does not."""
    assert zero_step(2, "--plugin", "ep", "--offload_optimizer") == (True, False)
    assert zero_step(2, "--plugin", "ep", "--offload_optimizer", "--no-lean_zero") == (False, False)
    assert zero_step(4, "--plugin", "ep_zero", "--extra_dp_size", "2", "--offload_optimizer", "--zero_stage",
                     "2") == (False, False)
    with pytest.raises(ValueError, match=r"^--adamw_kernel runs on the device; with --offload_optimizer the "
                                         r"optimizer step runs on the host \(torch's fused AdamW\): drop one of the "
                                         r"two$"):
        zero_step(2, "--plugin", "ep", "--offload_optimizer", "--adamw_kernel")
    with pytest.raises(ValueError, match=r"^--offload_optimizer keeps ZeRO's optimizer state in host memory: it "
                                         r"needs zero_stage >= 1 \(got 0\) and no pipeline \(pp_size 1;"):
        zero_step(1, "--plugin", "ep", "--zero_stage", "0", "--offload_optimizer")
    with pytest.raises(ValueError, match=r"needs zero_stage >= 1 \(got 1\) and no pipeline \(pp_size 2;"):
        zero_step(4, "--plugin", "hybrid", "--ep_size", "2", "--pp_size", "2", "--offload_optimizer")
    with pytest.raises(ValueError, match=r"^--load_balance moves experts' fp32 masters and Adam moments between "
                                         r"GPUs, but --offload_optimizer keeps them in host memory; accepted: one of "
                                         r"the two$"):
        zero_step(2, "--plugin", "ep", "--offload_optimizer", "--load_balance")


def test_offload_optimizer_checks_the_host_memory_it_will_need(monkeypatch):
    """ZeRO shards every trainable parameter once over the world, so a node of L of the world's W ranks holds L/W
    of 12 bytes (fp32 master and two moments) per trainable parameter; frozen parameters hold nothing. Too little
    available memory is refused in one line before ZeRO allocates anything."""
    from openmoe import OpenMoeForCausalLM
    from openmoe.finetune import trainable_parameters
    from openmoe.train.builder import check_host_memory

    cfg = preset("tiny")
    model = OpenMoeForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    big = 1 << 50
    for world, local, argv in ((2, 2, ["--plugin", "ep"]), (4, 4, ["--plugin", "ep_zero", "--extra_dp_size", "2"]),
                               (4, 2, ["--plugin", "ep"]), (4, 1, ["--plugin", "ep_zero", "--extra_dp_size", "2"])):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
        sizes = resolve_sizes(parse_args(argv + ["--offload_optimizer"]), cfg, world)
        assert check_host_memory(model, sizes, available=big) == pytest.approx(12 * total * local / world, abs=24)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    sizes = resolve_sizes(parse_args(["--plugin", "ep", "--offload_optimizer"]), cfg, 2)
    trainable_parameters(model, "experts")  # only the experts train: only they get optimizer state
    experts = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < experts < total
    assert check_host_memory(model, sizes, available=big) == pytest.approx(12 * experts, abs=24)
    with pytest.raises(ValueError, match=r"^--offload_optimizer needs about \d+\.\d GiB of host memory on this node "
                                         r"for the optimizer state \(2 ranks x \d+\.\d GiB: 12 bytes per parameter "
                                         r"of each rank's ZeRO shard\); 0\.0 GiB is available: spread the run over "
                                         r"more GPUs or nodes, or drop --offload_optimizer$"):
        check_host_memory(model, sizes, available=1000)
