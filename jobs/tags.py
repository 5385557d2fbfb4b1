"""The MLflow tags compound sets on runs and experiments, each named once.

A job's run, a sweep's parent and trial runs, and a pipeline's runs are found again by these tags (a
restarted driver continues its run), and the registry and `compound … status` read them back.
"""

JOB_TAG = "compound.job"  # a job's run: the job's name
SWEEP_TAG = "compound.sweep"  # a sweep's parent run: the sweep's name
TRIAL_TAG = "compound.trial"  # a trial's run: its Tune trial id
TRIAL_STATUS_TAG = "compound.trial_status"
MODEL_TAG = "compound.model_checkpoint"  # the checkpoint a run's logged model was made from
TEACHER_TAG = "compound.teacher"  # a distillation job's run: its spec's teacher
TEACHER_PINNED_TAG = "compound.teacher_pinned"  # … and the copy it distilled from
CODE_VERSION_TAG = "compound.code_version"
SUBMISSION_TAG = "compound.submission_id"  # the Ray submission that ran the driver
WORLD_SIZE_TAG = "compound.world_size"
STRATEGY_TAG = "compound.strategy"  # ddp | deepspeed-zero<stage>
CHECKPOINTS_TAG = "compound.checkpoints"  # the job's checkpoint folder
DATASET_TAG_PREFIX = "compound.dataset."  # + train | val: the split's dataset id (its manifest's sha256)
BEST_CHECKPOINT_TAG = "compound.best_checkpoint"  # a sweep's parent run: its best trial's …
BEST_TRIAL_TAG, BEST_JOB_TAG, BEST_RUN_TAG = "compound.best_trial", "compound.best_job", "compound.best_run_id"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: what nests a run under another in the UI
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow's own: which view the UI opens an experiment in
MODEL_TRAINING_KIND = "custom_model_development"  # … the runs and their charts, not the GenAI view
