"""The paper's experiment as a library: settings (`config`) and the run (`loop`).

`train_and_evaluate(TrainConfig(...), model_dir)` trains a CIFAR ResNet V2 with
or without operator-norm projections and writes everything under `model_dir`;
`tfconvnorm.cli.train` (`tfconvnorm-train`, `python train.py`) only turns flags
into a `TrainConfig`.
"""

from tfconvnorm.training.config import (BACKUP_DIR, BASE_BATCH_SIZE, BASE_LEARNING_RATE,
                                        CHECKPOINT_DIR, CONFIG_FILE, HISTORY_FILE, LOG_DIR,
                                        MODEL_FILE, PROGRESS, RECIPE_BOUNDARIES, RECIPE_EPOCHS,
                                        RESULTS_FILE, STRATEGIES, TrainConfig, check_model_dir,
                                        validate_config)
from tfconvnorm.training.loop import (build_model, learning_rate_schedule, make_strategy,
                                      operator_norms, train_and_evaluate)
