import pytest

from mt4ssl.data.labels import read_dict, read_labels, write_dict
from mt4ssl.data.manifest import Manifest
from mt4ssl.errors import InputError
from mt4ssl.models.cnn import num_frames

SIZES = (32001, 40007, 35555)


@pytest.fixture
def setup(tmp_path):
    manifest = Manifest(tmp_path / "train.tsv", tmp_path, ("a.flac", "b.flac", "c.flac"), SIZES)
    write_dict(tmp_path / "dict.km.txt", 10)
    return manifest, tmp_path


def write_km(path, rows):
    path.write_text("".join(" ".join(map(str, r)) + "\n" for r in rows))
    return path


def good_rows():
    return [[i % 10 for i in range(num_frames(n))] for n in SIZES]


def test_reads_good_labels(setup):
    manifest, d = setup
    labels = read_labels(write_km(d / "train.km", good_rows()), manifest)
    assert [len(x) for x in labels] == [num_frames(n) for n in SIZES] == [99, 124, 110]
    assert labels[1][:3].tolist() == [0, 1, 2]
    assert read_dict(d / "dict.km.txt") == [str(i) for i in range(10)]


def test_non_integer_label_names_line(setup):
    manifest, d = setup
    rows = good_rows()
    rows[1][5] = "x7"
    with pytest.raises(InputError, match=r"train\.km:2 \(b\.flac\): label 'x7' is not an integer"):
        read_labels(write_km(d / "train.km", rows), manifest)


def test_label_outside_dictionary(setup):
    manifest, d = setup
    rows = good_rows()
    rows[2][0] = 10
    with pytest.raises(InputError, match=r"train\.km:3 \(c\.flac\): label 10 is outside the dictionary .*0\.\.9"):
        read_labels(write_km(d / "train.km", rows), manifest)


def test_100hz_labels_fail_with_counts_and_rate(setup):
    manifest, d = setup
    rows = [[0] * (2 * num_frames(n)) for n in SIZES]
    with pytest.raises(InputError, match=r"train\.km:1 \(a\.flac\): 198 labels, but the model has 99 "
                                         r"frames at 50 Hz for 32001 samples \(that is about 100 Hz"):
        read_labels(write_km(d / "train.km", rows), manifest)


def test_off_by_one_count_fails(setup):
    manifest, d = setup
    rows = good_rows()
    rows[2].append(0)
    with pytest.raises(InputError, match=r"train\.km:3 \(c\.flac\): 111 labels, but the model has 110"):
        read_labels(write_km(d / "train.km", rows), manifest)


def test_line_count_mismatch(setup):
    manifest, d = setup
    with pytest.raises(InputError, match=r"train\.km: 2 lines, but .*train\.tsv has 3 entries"):
        read_labels(write_km(d / "train.km", good_rows()[:2]), manifest)


@pytest.mark.parametrize("text,message", [
    ("0 1\n1\n", r"dict\.km\.txt:2: expected 'SYMBOL COUNT'"),
    ("0 1\n2 1\n", r"symbols must be 0\.\.1 in order"),
    ("", "empty label dictionary"),
])
def test_bad_dictionary(setup, text, message):
    manifest, d = setup
    (d / "dict.km.txt").write_text(text)
    with pytest.raises(InputError, match=message):
        read_labels(write_km(d / "train.km", good_rows()), manifest)


def test_missing_files(setup):
    manifest, d = setup
    with pytest.raises(InputError, match="train.km: label file not found"):
        read_labels(d / "train.km", manifest)
    with pytest.raises(InputError, match="other.txt: label dictionary not found"):
        read_labels(d / "train.km", manifest, d / "other.txt")
