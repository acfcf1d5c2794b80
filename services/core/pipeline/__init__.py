"""One input (zip, folder or file) in, one StudyReport per study out.

prepare.py: intake, headers and per study everything up to the model input;
run.py: the model and the finished reports (``process_input`` chains both);
events.py: what the pipeline announces while it works; failures.py: Failure rows.
"""

from services.core.pipeline.events import STAGES, EventFanOut, PipelineEvents
from services.core.pipeline.prepare import (
    WORK_DIR_PREFIX,
    CheckFirst,
    PreparationDeferred,
    PreparedStudy,
    log_name,
    prepare_studies,
    preprocessing_target,
)
from services.core.pipeline.run import finish_study, model_info, process_input

__all__ = [
    "STAGES",
    "WORK_DIR_PREFIX",
    "CheckFirst",
    "EventFanOut",
    "PipelineEvents",
    "PreparationDeferred",
    "PreparedStudy",
    "finish_study",
    "log_name",
    "model_info",
    "prepare_studies",
    "preprocessing_target",
    "process_input",
]
