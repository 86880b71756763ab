"""TSV and JSONL readers and writers: round trips, the VLMEvalKit layout's conventions, and errors naming the row."""

import base64
import io
import json

import pytest
from PIL import Image

from kimivl.eval.data import Sample, build_prompt, read_dataset, read_jsonl, read_tsv, write_jsonl, write_tsv
from kimivl.eval.errors import DataError


def png(colour=(255, 0, 0), size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5, 5), (0, 0, 255)).save(buf, format="JPEG")
    return buf.getvalue()


SAMPLES = [
    Sample("0", "What is written?", ["hello"], [png()], category="word", extra={"split": "test"}),
    Sample("1", "Pick one:\tline two\nline three", ["B"], [png((0, 255, 0))],
           options={"A": "a cat", "B": "a \"dog\"", "C": "ünïcode"}, category="mc", hint="look closely",
           extra={"split": "test"}),
    Sample("2", "Two images", ["x", "X", "['y']"], [png(), jpeg()], category="multi", extra={"split": ""}),
    Sample("3", "looks like a list", ["[not, a, list]"], [png()], extra={"split": "train"}),
]


def test_tsv_round_trip(tmp_path):
    path = write_tsv(SAMPLES, tmp_path / "d.tsv")
    assert read_tsv(path) == SAMPLES
    assert read_dataset(path) == SAMPLES


def test_jsonl_round_trip(tmp_path):
    path = write_jsonl(SAMPLES, tmp_path / "sub" / "d.jsonl")
    assert (tmp_path / "sub" / "images" / "2_1.jpeg").is_file()
    assert read_jsonl(path) == SAMPLES
    first = json.loads(path.read_text().splitlines()[0])
    assert first["index"] == 0 and first["image"] == "images/0_0.png" and first["answer"] == "hello"


def test_tsv_vlmevalkit_conventions(tmp_path):
    """Answers as list literals, an `image` that names another row's index, `image_path` relative to the file,
    pandas' 'nan' for missing options, unknown columns kept."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "p.png").write_bytes(png((1, 2, 3)))
    b64 = base64.b64encode(png()).decode()
    rows = ["index\timage\timage_path\tquestion\tanswer\tA\tB\tC\tcategory\tl2-category",
            f"10\t{b64}\t\tq1\t['Paris', 'paris']\tx\ty\tnan\tcat1\tl2",
            "1000010\t10\t\tq1 again\tA\ty\tx\t\tcat1\tl2",
            "11\t\timgs/p.png\tq2\t42\t\t\t\tcat2\t"]
    (tmp_path / "d.tsv").write_text("\n".join(rows) + "\n")
    s = read_tsv(tmp_path / "d.tsv")
    assert s[0].answers == ["Paris", "paris"] and s[0].options == {"A": "x", "B": "y"}
    assert s[1].images == s[0].images == [png()]  # shared by reference to index 10
    assert s[2].images == [png((1, 2, 3))] and s[2].answers == ["42"] and s[2].options == {}
    assert s[0].extra == {"l2-category": "l2"}


def test_build_prompt():
    assert build_prompt(SAMPLES[0]) == "What is written?"
    assert build_prompt(SAMPLES[1]) == ('Hint: look closely\nQuestion: Pick one:\tline two\nline three\nOptions:\n'
                                        'A. a cat\nB. a "dog"\nC. ünïcode\n'
                                        'Please select the correct answer from the options above.')


def test_pil_images_decode_and_name_the_sample():
    assert SAMPLES[2].pil_images()[1].size == (5, 5)
    truncated = Sample("9", "q", ["a"], [png()[:40]])
    with pytest.raises(DataError, match="sample 9: image 0: cannot decode"):
        truncated.pil_images()


def write(tmp_path, text, name="d.tsv"):
    (tmp_path / name).write_text(text)
    return tmp_path / name


def test_tsv_errors_name_the_problem(tmp_path):
    b64 = base64.b64encode(png()).decode()
    with pytest.raises(DataError, match="is empty"):
        read_tsv(write(tmp_path, ""))
    with pytest.raises(DataError, match="is empty"):
        read_tsv(write(tmp_path, " \n\n"))
    with pytest.raises(DataError, match="no rows"):
        read_tsv(write(tmp_path, "index\timage\tquestion\tanswer\n"))
    with pytest.raises(DataError, match=r"missing column 'question' \(found: index, image, answer\)"):
        read_tsv(write(tmp_path, f"index\timage\tanswer\n0\t{b64}\ta\n"))
    with pytest.raises(DataError, match=r"missing column 'image \(or image_path\)'"):
        read_tsv(write(tmp_path, "index\tquestion\tanswer\n0\tq\ta\n"))
    bad = base64.b64encode(b"not an image at all").decode()
    with pytest.raises(DataError, match=r"row 2 \(line 3\): the image is not a readable image file"):
        read_tsv(write(tmp_path, f"index\timage\tquestion\tanswer\n0\t{b64}\tq\ta\n1\t{bad}\tq\ta\n"))
    with pytest.raises(DataError, match="row 1 .*not valid base64"):
        read_tsv(write(tmp_path, "index\timage\tquestion\tanswer\n0\t@@@@\tq\ta\n"))
    with pytest.raises(DataError, match="row 1 .*no image"):
        read_tsv(write(tmp_path, "index\timage\tquestion\tanswer\n0\t\tq\ta\n"))
    with pytest.raises(DataError, match="row 1 .*imgs/missing.png does not exist"):
        read_tsv(write(tmp_path, "index\timage_path\tquestion\tanswer\n0\timgs/missing.png\tq\ta\n"))
    with pytest.raises(DataError, match="row 1 .*3 fields, the header has 4"):
        read_tsv(write(tmp_path, f"index\timage\tquestion\tanswer\n0\t{b64}\tq\n"))
    with pytest.raises(DataError, match="index '0' appears twice"):
        read_tsv(write(tmp_path, f"index\timage\tquestion\tanswer\n0\t{b64}\tq\ta\n0\t{b64}\tq\tb\n"))


def test_jsonl_errors_name_the_line(tmp_path):
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "bad.png").write_bytes(b"garbage")
    good = json.dumps({"index": 0, "image": "ok.png", "question": "q", "answer": "a"})
    with pytest.raises(DataError, match="is empty"):
        read_jsonl(write(tmp_path, "", "d.jsonl"))
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        read_jsonl(write(tmp_path, good + "\n{oops\n", "d.jsonl"))
    with pytest.raises(DataError, match="line 1: missing key 'answer'"):
        read_jsonl(write(tmp_path, json.dumps({"index": 0, "image": "ok.png", "question": "q"}), "d.jsonl"))
    with pytest.raises(DataError, match=r"line 3: the image \(.*bad.png\) is not a readable image file"):
        read_jsonl(write(tmp_path, good + "\n\n" + good.replace("ok.png", "bad.png").replace("0", "1"), "d.jsonl"))
    with pytest.raises(DataError, match="unknown data format '.csv'"):
        read_dataset(tmp_path / "d.csv")
    with pytest.raises(DataError, match="no such file"):
        read_dataset(tmp_path / "nope.tsv")
