"""Suite-wide settings: one intra-op thread per test process.

Without this each test process (and every ./train.sh it starts) takes a thread per core: on a shared or busy
2-core machine the suite then runs several times slower, and pytest-xdist's workers would oversubscribe the
cores. A value the caller set (OMP_NUM_THREADS=4 python -m pytest ...) is kept.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])


def pytest_configure(config):
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# Tests that take seconds each (./train.sh and other subprocess runs, torch.compile, exports, full-width
# models): `pytest -m "not slow" tests` leaves them out for a quick check while editing (docs/contributing.md).
# The README's command (what CI runs) runs them all. Listed here as file::function so one place says what a
# quick run skips; a name that no longer exists fails the run (pytest_collection_finish below).
SLOW = """
test_ablation::test_ablation_trains_compares_and_analyses
test_analyze_channels::test_cli_compares_two_models
test_analyze_channels::test_probe_finds_every_site_and_block
test_bad_inputs::test_command_line_exit_code
test_bad_inputs::test_late_refusals_through_train_sh_with_two_processes_and_workers
test_benchmark_tool::test_bench_blocks_tables_at_a_tiny_size
test_benchmark_tool::test_check_mode_passes_on_cpu
test_benchmark_tool::test_runs_end_to_end_and_writes_json
test_ce::test_compiles_without_graph_breaks
test_ce::test_sync_stats_matches_single_process_full_batch
test_coco::test_a_detector_resumes_exactly_after_sigterm
test_coco::test_distributed_evaluation_counts_every_image_once
test_coco::test_train_sh_two_processes_with_workers_then_test_sh_reproduces_the_ap
test_compare::test_reads_a_two_process_run_started_with_train_sh
test_config::test_cli_refuses_bad_override_and_writes_nothing
test_configs_smoke::test_config_trains_one_step
test_deploy::test_deploy_a_features_only_backbone
test_deploy::test_deploy_cli_end_to_end
test_deploy::test_dynamo_onnx_exporter_round_trip_ce_ed
test_deploy::test_ed_resnet_exported_at_64_runs_at_80_and_72x96
test_deploy::test_ed_traced_and_exported_with_dynamic_dims_run_at_other_sizes
test_deploy::test_export_round_trip_per_block
test_detection::test_a_plugin_only_on_dropped_stages_is_refused_not_dropped
test_detection::test_create_feature_extractor_and_symbolic_trace_equal_eager
test_detection::test_faster_rcnn_with_fpn_trains_and_infers_on_our_backbones
test_detection::test_features_have_the_documented_shapes
test_detection::test_the_documented_detection_example_runs
test_docs::test_block_reference_is_generated_from_the_registries
test_docs::test_every_documented_command_runs_or_is_checked
test_ed::test_readme_gflops_table
test_fast_paths::test_compiled_training_of_every_block_matches_eager
test_fast_paths::test_every_block_trains_in_every_precision_and_layout
test_fast_paths::test_train_sh_two_processes_sync_bn_ce_sync_stats_compiled
test_finetune::test_finetune_through_train_sh_two_processes_workers_syncbn_bf16_channels_last
test_finetune::test_the_finetuning_page_runs_its_snippet_and_names_real_keys_and_configs
test_install::test_the_active_venv_wins_over_the_repositorys
test_install::test_train_sh_prefers_the_repositorys_venv
test_install::test_train_sh_runs_where_only_python3_exists
test_integrity::test_every_shipped_config_has_its_own_default_work_dir
test_integrity::test_resume_and_test_sh_refuse_a_flipped_bit_two_processes
test_integrity::test_test_sh_from_a_work_dir_alone_two_processes
test_integrity::test_train_sh_refuses_another_recipe_and_writes_nothing
test_launch::test_a_data_error_in_a_worker_of_rank_1_is_one_line_naming_it
test_launch::test_a_node_that_never_comes_fails_early_with_a_clear_message
test_launch::test_bad_override_with_two_processes_is_refused_once
test_launch::test_ctrl_c_with_data_workers_saves_and_exits_75_in_one_line
test_launch::test_fault_inject_on_the_real_path
test_launch::test_one_process_ignores_torchrun_and_slurm_variables_left_in_the_shell
test_launch::test_startup_imports_only_what_it_needs
test_launch::test_torchrun_still_runs_the_trainer
test_launch::test_train_sh_two_processes_sigterm_75_then_resume
test_models::test_every_combination_is_refused_at_load_or_builds_runs_and_trains
test_models::test_plain_backbone_equals_torchvision_keys_and_params
test_predict::test_predict_agrees_with_test_sh_eager_and_onnx
test_reliability::test_quick_fault_injection
test_reliability::test_second_run_on_a_work_dir_is_refused_and_a_killed_holder_leaves_no_lock
test_rows::test_rows_table_is_in_sync
test_rows::test_shufflenet_rows_train_through_train_sh
test_rows::test_torchvision_shufflenet_checkpoint_evaluates_with_test_sh
test_run_output::test_two_processes_print_a_summary_and_stop_and_resume_messages_that_agree
test_train::test_cli_sigterm_exits_75_then_resumes
test_watchdog::test_a_killed_data_worker_ends_a_two_process_run_with_76_in_one_line
test_watchdog::test_a_stopped_rank_or_worker_ends_a_two_process_run_in_one_line
test_watchdog::test_ctrl_c_during_test_sh_is_one_line_exit_75
test_watchdog::test_sigterm_during_validation_saves_within_seconds_and_resume_validates
""".split()


def _slow_key(item):
    return f"{item.module.__name__.rsplit('.', 1)[-1]}::{item.originalname}"


def pytest_collection_modifyitems(config, items):
    import pytest
    for item in items:
        if getattr(item, "module", None) is not None and _slow_key(item) in SLOW:
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session):
    """A SLOW entry naming no test (renamed or removed) is an error, when the file it names was collected."""
    seen = {_slow_key(i) for i in session.items if getattr(i, "module", None) is not None}
    files = {k.split("::")[0] for k in seen}
    stale = [k for k in SLOW if k.split("::")[0] in files and k not in seen]
    if stale and not session.config.getoption("keyword") and not session.config.getoption("markexpr"):
        raise RuntimeError(f"tests/conftest.py SLOW names tests that do not exist: {stale}")
