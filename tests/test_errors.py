"""The errors a user can cause: every one is a UserError carrying its exit status, main() prints it as one
line on stderr, and the command line's own refusals are UsageErrors, not scenario errors."""

import pytest

from tokenrig import exit_status
from tokenrig.cli import main
from tokenrig.errors import UsageError, UserError
from tokenrig.loadgen.scenario import ScenarioError
from tokenrig.metrics.records import RecordWriteError
from tokenrig.monitor.exporter import ExporterPortError
from tokenrig.profiles import UnknownProfileError
from tokenrig.report.compare import CompareError
from tokenrig.report.rundir import ResultsDirError
from tokenrig.report.runs import NoRunsError
from tokenrig.serve.fit import FitError, UnknownQuantError
from tokenrig.serve.remote import RemoteError
from tokenrig.serve.spec import LaunchError
from tokenrig.train.spec import TrainSpecError

BAD_INPUT_ERRORS = (UsageError, ScenarioError, UnknownProfileError, UnknownQuantError, LaunchError, TrainSpecError,
                    CompareError, ResultsDirError, NoRunsError, RemoteError, ExporterPortError)


@pytest.mark.parametrize("error_class", BAD_INPUT_ERRORS)
def test_every_bad_input_error_is_a_user_error_exiting_2(error_class):
    assert issubclass(error_class, UserError)
    assert error_class.exit_code == exit_status.BAD_INPUT and error_class.label == "error"


def test_a_model_that_does_not_fit_is_a_user_error_exiting_3_and_keeps_its_old_base():
    assert issubclass(FitError, UserError) and issubclass(FitError, ValueError)
    assert FitError.exit_code == exit_status.DOES_NOT_FIT and FitError.label == "does not fit"


def test_records_that_cannot_be_written_are_a_user_error_exiting_1_and_keep_their_old_base():
    """main() prints it as any user error; test_reliability runs the CLI out of disk (one line, exit 1)."""
    assert issubclass(RecordWriteError, UserError) and issubclass(RecordWriteError, OSError)
    assert RecordWriteError.exit_code == exit_status.FAILED and RecordWriteError.label == "error"


def test_usage_errors_are_not_scenario_errors():
    assert not issubclass(UsageError, ScenarioError) and not issubclass(ScenarioError, UsageError)


def test_main_prints_a_usage_error_as_one_line_and_exits_2(capsys):
    assert main(["capacity", "--slo", "ttft_p99=1s"]) == exit_status.BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("tokenrig: error: give --from DIR") and err.count("\n") == 1


def test_main_prints_a_fit_error_with_its_label_and_exits_3(capsys):
    assert main(["fit", "--model", "llama2-70b", "--gpu", "rtx4090", "--tp", "1"]) == exit_status.DOES_NOT_FIT
    assert capsys.readouterr().err.startswith("tokenrig: does not fit: llama2-70b bf16 does not fit on 1 x rtx4090")
