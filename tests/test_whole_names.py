"""Names and numbers are matched whole: ``\\Z`` (or ``fullmatch``), never ``$``, which
matches before a trailing newline, and digits parsed as numbers are ASCII ones only."""

from __future__ import annotations

import json

import pytest

from tests.intake_fixtures import cloudwatch_alarm

# -- registry index keys (blocks/_indexes.py) ----------------------------------------------


@pytest.mark.parametrize("name", ["production", "v1.2-rc_3"])
def test_an_index_key_part_keeps_a_plain_name(name):
    from blocks._indexes import part

    assert part(name) == name


@pytest.mark.parametrize("name", ["production\n", "production\r\n", "prod\nuction", "\nprod"])
def test_an_index_key_part_with_a_newline_is_a_digest(name):
    from blocks._indexes import part

    key = part(name)
    assert key.startswith("h-") and "\n" not in key and "\r" not in key
    assert key != part("production")  # never a plain name's key


# -- MLflow import (blocks/serving/mlflow_import.py) ----------------------------------------


@pytest.mark.parametrize("path", ["model/MLmodel\n", "model\n/MLmodel", "model.pkl\n"])
def test_an_mlflow_artifact_path_ending_in_a_newline_is_refused(path):
    from blocks.serving.mlflow_import import ImportRefused, check_artifact_path

    with pytest.raises(ImportRefused, match="not a plain relative path"):
        check_artifact_path(path)


def test_a_plain_mlflow_artifact_path_is_kept():
    from blocks.serving.mlflow_import import check_artifact_path

    assert check_artifact_path("model/MLmodel") == "model/MLmodel"


def test_mlflow_version_numbers_and_aliases_match_whole():
    from blocks.serving.mlflow_import import _ALIAS_RE, _NUMBER_RE

    assert _NUMBER_RE.fullmatch("3") and _ALIAS_RE.fullmatch("champion")
    # a trailing newline; an Arabic-Indic and a full-width three
    for bad in ("3\n", "3\r\n", "\u0663", "\uff13"):
        assert not _NUMBER_RE.fullmatch(bad), bad
    assert not _ALIAS_RE.fullmatch("champion\n")


@pytest.mark.parametrize("ref", ["churn/\u0663", "churn/\uff13", "churn/3\n4", "churn@champ\nion"])
def test_an_mlflow_reference_with_a_newline_or_other_digits_is_refused(ref):
    from blocks.serving.mlflow_import import ImportRefused, parse_ref

    with pytest.raises(ImportRefused):
        parse_ref(ref)


# -- Slack mentions (intake/slack.py) -------------------------------------------------------


def test_a_slack_id_ending_in_a_newline_is_not_a_mention():
    from intake.slack import mention

    assert mention("U03OPS") == "<@U03OPS>"
    for identity in ("U03OPS\n", "U03OPS\r\n", "W1\n"):
        out = mention(identity)
        assert not out.startswith("<@"), repr(out)


# -- CloudWatch datapoints (intake/sources.py) ----------------------------------------------


def _reason(datapoint: str) -> str:
    alarm = cloudwatch_alarm()
    alarm["NewStateReason"] = (
        f"Threshold Crossed: 1 out of the last 1 datapoints [{datapoint} (26/11/26 09:29:00)] "
        "was less than the threshold (0.9)."
    )
    return json.dumps(alarm)


@pytest.mark.parametrize("datapoint, value", [("0.71", 0.71), ("-1.5e-2", -0.015), ("7", 7.0)])
def test_an_ascii_cloudwatch_datapoint_is_read(datapoint, value):
    from intake.sources import cloudwatch

    (alert,) = cloudwatch(_reason(datapoint))
    assert alert.value == value


#: 0.71 in Arabic-Indic and full-width digits, mixed, in Persian digits; 1 in Arabic-Indic
OTHER_DIGITS = [
    "\u0660.\u0667\u0661",
    "\uff10.\uff17\uff11",
    "0.7\u0661",
    "\u06f0.\u06f7",
    "\u0661",
]


@pytest.mark.parametrize("datapoint", OTHER_DIGITS)
def test_a_cloudwatch_datapoint_in_other_digits_is_a_400_naming_the_field(datapoint):
    from intake.errors import BadRequest
    from intake.sources import cloudwatch

    assert float(datapoint) > 0  # what float() would have read
    with pytest.raises(BadRequest) as e:
        cloudwatch(_reason(datapoint))
    assert e.value.field == "Message.NewStateReason" and e.value.status == 400
    assert "ASCII" in e.value.message


def test_a_cloudwatch_reason_without_a_datapoint_has_no_value():
    from intake.sources import cloudwatch

    alarm = cloudwatch_alarm()
    alarm["NewStateReason"] = "Unchecked: Initial alarm creation"
    (alert,) = cloudwatch(json.dumps(alarm))
    assert alert.value is None
