"""Caption templates: fields, clean-up and clear errors."""

from __future__ import annotations

import pytest

from runner.stages import caption
from runner.core.errors import StageError

CFG = {"trigger": "vlntna", "class_word": "woman", "template": "{trigger} {class}, {shot}, {attributes}",
       "extra_tags": ["film grain"], "model": None}


def entry(**kw):
    e = {"shot": "close_up", "pose": {"yaw": 30.0, "pitch": 20.0, "roll": 0.0},
         "expression": {"smiling": True, "mouth_open": True, "eyes_closed": False},
         "exposure": {"mean": 0.5, "side_balance": 0.3}, "people": 1}
    e.update(kw)
    return e


def test_template_fields():
    fields = caption.caption_fields(entry(), CFG)
    text = caption.render_caption(CFG["template"], fields)
    assert text == "vlntna woman, close-up, three-quarter view, looking up, smiling, side lighting, solo, film grain"


def test_empty_fields_leave_no_double_commas():
    e = entry(pose=None, exposure=None, people=0, shot="wide")
    text = caption.render_caption("{trigger}, {pose}, {lighting}, {shot}, {expression},",
                                  caption.caption_fields(e, CFG))
    assert text == "vlntna, wide shot"


def test_group_and_model_text():
    fields = caption.caption_fields(entry(people=3, expression={}), CFG, model_text=" a woman on a stage ")
    assert fields["people"] == "3 people" and fields["expression"] == "neutral expression"
    assert fields["attributes"].endswith("3 people, a woman on a stage, film grain")


@pytest.mark.parametrize("template,msg",
                         [("{trigger} {mood}", "unknown field {mood}"), ("{trigger", "dataset.captions.template")])
def test_bad_template_is_a_stage_error(template, msg):
    with pytest.raises(StageError, match=msg.replace("{", r"\{").replace("}", r"\}")):
        caption.check_template(template, "dataset.captions.template")


def test_missing_captioning_model_is_a_clear_error(tmp_path):
    cap = caption.ModelCaptioner("no-such-model-folder/blip", tmp_path)
    from PIL import Image

    with pytest.raises(StageError, match="dataset.captions.model"):
        cap(Image.new("RGB", (32, 32)))
