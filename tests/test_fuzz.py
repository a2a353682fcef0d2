"""Fuzzing the loaders with hypothesis: random configs and mutated VOC XML.

Whatever comes in, the only thing that may come out besides a result is one of the project's own errors
(``PrunepipeError``) with a one-line message: never a ``pydantic.ValidationError``, ``KeyError``,
``TypeError``, ``UnicodeDecodeError``, an ``ET.ParseError`` or anything else from deep inside a library.
Examples are bounded (``max_examples``) so the file stays well under a minute.
"""

from __future__ import annotations

import copy
import shutil
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from compression.config import PipelineConfig, load_config, validate_config
from compression.data.digits import DIGIT_CLASSES, write_digits_voc
from compression.data.voc import VOCDetection
from compression.errors import DataError, PrunepipeError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None,
                derandomize=True)


def assert_one_line(error: PrunepipeError) -> None:
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, repr(message)


# ---------------------------------------------------------------------------------------------- configs

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["voc", "seed", "taylor", "ssd_vgg_lite", "vgg16_cifar", "2007:test", "conv1_1", "1e-3"])
)
# Any value YAML could give: scalars, lists and mappings of them, nested a few levels.
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _sub_model(annotation: typing.Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _sub_model(arg)
        if found is not None:
            return found
    return None


def config_dicts(model: type[BaseModel] = PipelineConfig, depth: int = 0) -> st.SearchStrategy[dict]:
    """Mappings over the real schema's keys (any subset, nested sections, lists of phases), each key's value
    either what it expects or anything at all, plus a few unknown keys."""
    optional: dict[str, st.SearchStrategy] = {}
    for name, info in model.model_fields.items():
        section = _sub_model(info.annotation)
        if section is not None and depth < 3:
            nested = config_dicts(section, depth + 1)
            is_list = typing.get_origin(info.annotation) is list or any(
                typing.get_origin(arg) is list for arg in typing.get_args(info.annotation))
            optional[name] = (st.lists(nested, max_size=2) if is_list else nested) | values
        else:
            optional[name] = values
    known = st.fixed_dictionaries({}, optional=optional)
    unknown = st.dictionaries(st.text(max_size=8), values, max_size=2)
    return st.builds(lambda a, b: {**b, **a}, known, unknown)


@FUZZ
@given(raw=config_dicts())
def test_random_config_dicts_give_a_config_or_a_config_error(raw):
    try:
        cfg = validate_config(raw, "fuzz")
    except PrunepipeError as exc:
        assert_one_line(exc)
    else:
        assert isinstance(cfg, PipelineConfig)


key_paths = st.sampled_from([
    "name", "seed", "data.kind", "data.root", "data.test_sets", "data.batch_size", "model.name",
    "model.width_mult", "stages.selection.gamma", "stages.selection.prune_ratio", "stages.sparsity.l1_lambda",
    "stages.sparsity.alpha_grid", "stages.phases", "compute.num_workers", "tracking.mlflow_uri", "nope.deeper",
]) | st.text(max_size=15)
override_values = st.text(max_size=20) | st.sampled_from(["[1, 2", "{a: 1}", "null", "-1", ".nan", "!!python/none", "&a *a"])


@FUZZ
@given(document=st.one_of(values.map(lambda v: yaml.safe_dump(v, allow_unicode=True).encode()),
                          config_dicts().map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode()),
                          st.binary(max_size=60)),
       overrides=st.lists(st.builds(lambda k, sep, v: f"{k}{sep}{v}", key_paths, st.sampled_from(["=", "", "=="]),
                                    override_values), max_size=3))
def test_random_yaml_files_and_overrides_give_a_config_or_a_config_error(tmp_path_factory, document, overrides):
    """The YAML file (any bytes, any structure) and ``--set`` strings as the CLI passes them."""
    folder = tmp_path_factory.mktemp("cfg", numbered=True)
    file = folder / "fuzz.yaml"
    file.write_bytes(document)
    try:
        cfg = load_config(file, overrides)
    except PrunepipeError as exc:
        assert_one_line(exc)
    else:
        assert isinstance(cfg, PipelineConfig)
    finally:
        shutil.rmtree(folder)


# ---------------------------------------------------------------------------------------------- VOC XML


@pytest.fixture(scope="module")
def devkit(tmp_path_factory) -> Path:
    return write_digits_voc(tmp_path_factory.mktemp("fuzz-voc"), seed=0, num_images={"train": 2, "val": 2, "test": 2})


def _xml_path(devkit: Path) -> Path:
    first = (devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    return devkit / "VOC2007" / "Annotations" / f"{first}.xml"


numbers_as_text = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "nan", "inf", "-inf", "1e400", "0x10", "1_0", "12px", "１２", "-0", "128.5"]),
    st.text(max_size=8),
)
xml_safe_text = numbers_as_text.map(lambda t: "".join(c for c in t if c.isprintable() and c not in "\ud800\udfff"))

# An element-level edit: (operation, which element (index into the document's elements), new text/tag).
edits = st.tuples(st.sampled_from(["drop", "duplicate", "text", "tag", "empty", "root"]), st.integers(0, 200),
                  xml_safe_text)

# A byte-level edit after serialising: truncation, garbage bytes (not UTF-8), declarations and entities.
byte_edits = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=6)),
    st.tuples(st.just("prefix"), st.sampled_from([
        b'<?xml version="1.0" encoding="bogus"?>',
        b'<?xml version="1.0" encoding="utf-16"?>',
        b'<?xml version="1.0" encoding="latin-1"?>',
        b"\xef\xbb\xbf",
        b'<!DOCTYPE annotation [<!ENTITY w "128">]>',
        b'<!DOCTYPE annotation [<!ENTITY x SYSTEM "file:///etc/passwd">]>',
        b'<!DOCTYPE annotation SYSTEM "http://127.0.0.1:9/x.dtd">',
        b"<!-- comment -->",
    ])),
    st.tuples(st.just("replace"), st.sampled_from([b"128", b"<name>", b"</bndbox>", b"annotation"]),
              st.sampled_from([b"&w;", b"&x;", b"&amp;", b"&#0;", b"\xff\xfe", b"", b"-5", b"99999999999"])),
)


def _mutate(original: bytes, element_edits, byte_level) -> bytes:
    root = ET.fromstring(original)
    for operation, index, text in element_edits:
        if operation == "root":  # the wrong root element (<annotations>, <x1>, ...)
            root.tag = "t" + "".join(c for c in text if c.isascii() and c.isalnum())
            continue
        elements = [(parent, child) for parent in root.iter() for child in parent]
        if not elements:
            break
        parent, child = elements[index % len(elements)]
        if operation == "drop":
            parent.remove(child)
        elif operation == "duplicate":
            parent.append(copy.deepcopy(child))
        elif operation == "text":
            child.text = text
        elif operation == "tag":
            child.tag = "t" + "".join(c for c in text if c.isascii() and c.isalnum())  # a valid XML name
        elif operation == "empty":
            child[:] = []
            child.text = None
    data = ET.tostring(root, encoding="utf-8")
    for edit in byte_level:
        if edit[0] == "truncate":
            data = data[: int(len(data) * edit[1])]
        elif edit[0] == "insert":
            at = int(len(data) * edit[1])
            data = data[:at] + edit[2] + data[at:]
        elif edit[0] == "prefix":
            data = edit[1] + data
        elif edit[0] == "replace":
            data = data.replace(edit[1], edit[2], 1)
    return data


@FUZZ
@given(element_edits=st.lists(edits, max_size=4), byte_level=st.lists(byte_edits, max_size=2))
def test_mutated_voc_xml_loads_or_raises_a_data_error(devkit, element_edits, byte_level):
    xml_path = _xml_path(devkit)
    original = xml_path.read_bytes()
    try:
        xml_path.write_bytes(_mutate(original, element_edits, byte_level))
        try:
            dataset = VOCDetection(devkit, ["2007:test"], DIGIT_CLASSES)
            for index in range(len(dataset)):
                image, target = dataset[index]
                boxes = target["boxes"]
                assert image.shape[1:] == boxes.canvas_size
                assert bool((boxes[:, 2:] > boxes[:, :2]).all()), boxes
                assert bool((boxes >= 0).all()) and bool((boxes[:, 2] <= image.shape[2]).all())
        except PrunepipeError as exc:
            assert isinstance(exc, DataError), exc
            assert_one_line(exc)
    finally:
        xml_path.write_bytes(original)


def test_the_xml_mutator_reaches_both_outcomes(devkit):
    """The fuzz test above is only worth something if mutations both pass and fail: check one of each."""
    xml_path = _xml_path(devkit)
    original = xml_path.read_bytes()
    try:
        xml_path.write_bytes(_mutate(original, [("duplicate", 0, "")], []))  # a second <folder>: harmless
        assert len(VOCDetection(devkit, ["2007:test"], DIGIT_CLASSES)) == 2
        xml_path.write_bytes(_mutate(original, [], [("truncate", 0.5)]))
        with pytest.raises(DataError, match="malformed XML"):
            VOCDetection(devkit, ["2007:test"], DIGIT_CLASSES)
    finally:
        xml_path.write_bytes(original)


# ---------------------------------------------------------------------------------------------- entities

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE annotation [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<annotation><folder>&lol9;</folder></annotation>
"""


@pytest.mark.parametrize("document", [
    pytest.param(BILLION_LAUGHS, id="billion-laughs"),
    pytest.param(b'<?xml version="1.0"?>\n<!DOCTYPE annotation [<!ENTITY secret SYSTEM "file://{secret}">]>\n'
                 b"<annotation><size><width>128</width><height>128</height></size>"
                 b"<object><name>&secret;</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax>"
                 b"</bndbox></object></annotation>", id="external-entity"),
    pytest.param(b'<?xml version="1.0"?>\n<!DOCTYPE annotation [<!ENTITY w "128">]>\n'
                 b"<annotation><size><width>&w;</width><height>&w;</height></size></annotation>",
                 id="internal-entity"),
    pytest.param('<?xml version="1.0" encoding="utf-16"?>\n<!DOCTYPE annotation [<!ENTITY w "128">]>\n'
                 "<annotation><size><width>&w;</width><height>&w;</height></size></annotation>".encode("utf-16"),
                 id="entity-in-utf16"),
])
def test_documents_with_a_dtd_are_refused(devkit, tmp_path, document):
    """xml.etree (expat) would expand internal entities and, since expat 2.4, stop a billion laughs; it never
    fetches external ones. The loader goes further: VOC annotations have no DTD, so any <!DOCTYPE> is refused
    before a single entity is expanded, whatever the encoding."""
    secret = tmp_path / "secret.txt"
    secret.write_text("do-not-read")
    xml_path = _xml_path(devkit)
    original = xml_path.read_bytes()
    try:
        xml_path.write_bytes(document.replace(b"{secret}", str(secret).encode()))
        with pytest.raises(DataError, match=r"declares a DTD or entities") as caught:
            VOCDetection(devkit, ["2007:test"], DIGIT_CLASSES)
        assert "do-not-read" not in str(caught.value)
    finally:
        xml_path.write_bytes(original)


@settings(FUZZ, max_examples=80)
@given(lines=st.lists(st.text(max_size=14) | st.sampled_from(["..", ".", "/etc/passwd", "../../x", "a\\b", "000001",
                                                                "~root", "con", "a\x00b"]), max_size=4),
       raw=st.binary(max_size=12))
def test_random_split_lists_load_or_raise_a_data_error(devkit, lines, raw):
    """Image ids come from the split list: anything in it ends in a dataset of files inside the devkit, or a DataError."""
    split = devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt"
    original = split.read_bytes()
    try:
        split.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n" + raw)
        try:
            dataset = VOCDetection(devkit, ["2007:test"], DIGIT_CLASSES)
        except PrunepipeError as exc:
            assert isinstance(exc, DataError), exc
            assert_one_line(exc)
        else:
            inside = (devkit / "VOC2007").resolve()
            assert all(a.image_path.resolve().is_relative_to(inside) for a in dataset.annotations)
    finally:
        split.write_bytes(original)
