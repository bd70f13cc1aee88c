"""Output files: input order, durable prefix + side file, exact resume after a cut, chunk merge,
and bad input lines named by file and line."""

import json
import random
import threading

import pytest

from servegen.errors import ServegenError
from servegen.generation.files import OrderedWriter, count_rows, done_marker, merge_chunks, read_rows


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_come_out_in_input_order_whatever_the_finish_order(tmp_path):
    out = tmp_path / "output.jsonl"
    writer = OrderedWriter(out)
    assert writer.resume() == 0
    order = list(range(200))
    random.Random(0).shuffle(order)
    for i in order:
        writer.add(i, {"i": i})
    writer.close(complete=True)
    assert [r["i"] for r in rows_of(out)] == list(range(200))
    assert not writer.side_path.exists()
    assert not done_marker(out).exists()  # the job marks it done once its summary is written


def test_finished_rows_are_on_disk_at_once(tmp_path):
    out = tmp_path / "output.jsonl"
    writer = OrderedWriter(out)
    writer.resume()
    writer.add(1, {"i": 1})  # row 0 still in flight
    writer.add(0, {"i": 0})
    writer.add(3, {"i": 3})
    # without closing (as if killed now): the output prefix and the side file hold every finished row
    assert [r["i"] for r in rows_of(out)] == [0, 1]
    assert [(r["_servegen_row"], r["row"]) for r in rows_of(writer.side_path)] == [(3, {"i": 3})]
    assert not done_marker(out).exists()


def test_the_side_file_is_emptied_when_its_rows_reach_the_output(tmp_path):
    out = tmp_path / "output.jsonl"
    writer = OrderedWriter(out)
    writer.resume()
    for i in [2, 1]:
        writer.add(i, {"i": i})
    assert len(rows_of(writer.side_path)) == 2
    writer.add(0, {"i": 0})  # 0, 1, 2 all in the output now
    assert writer.side_path.read_text() == ""
    writer.add(4, {"i": 4})
    assert [r["_servegen_row"] for r in rows_of(writer.side_path)] == [4]
    # a run killed before the side file was emptied: records already in the output are ignored
    with open(writer.side_path, "a") as f:
        f.write(json.dumps({"_servegen_row": 1, "row": {"i": 1}}) + "\n")
    again = OrderedWriter(out)
    assert again.resume() == 4
    assert [i for i in range(6) if not again.is_done(i)] == [3, 5]


def test_a_row_with_the_side_files_own_key_keeps_it(tmp_path):
    out = tmp_path / "output.jsonl"
    writer = OrderedWriter(out)
    writer.resume()
    writer.add(1, {"_servegen_row": "mine", "i": 1})
    again = OrderedWriter(out)
    again.resume()
    again.add(0, {"i": 0})
    again.close(complete=True)
    assert rows_of(out) == [{"i": 0}, {"_servegen_row": "mine", "i": 1}]


def test_resume_after_a_cut_mid_line_gives_every_row_once(tmp_path):
    out = tmp_path / "output.jsonl"
    first = OrderedWriter(out)
    first.resume()
    for i in [0, 1, 2, 5, 7]:
        first.add(i, {"i": i, "text": "x" * 50})
    # a kill -9 in the middle of a write leaves half lines in both files
    with open(out, "a") as f:
        f.write('{"i": 3, "te')
    with open(first.side_path, "a") as f:
        f.write('{"_servegen_row": 6, "i"')

    second = OrderedWriter(out)
    assert second.resume() == 5
    todo = [i for i in range(10) if not second.is_done(i)]
    assert todo == [3, 4, 6, 8, 9]
    for i in todo:
        second.add(i, {"i": i, "text": "x" * 50})
    second.close(complete=True)
    assert [r["i"] for r in rows_of(out)] == list(range(10))


def test_writer_for_a_chunk_starts_at_its_first_row(tmp_path):
    out = tmp_path / "output_chunk1.jsonl"
    writer = OrderedWriter(out, first_index=50)
    writer.resume()
    writer.add(51, {"i": 51})
    writer.add(50, {"i": 50})
    writer.close(complete=True)
    assert [r["i"] for r in rows_of(out)] == [50, 51]


def test_close_complete_with_missing_rows_is_an_error(tmp_path):
    writer = OrderedWriter(tmp_path / "o.jsonl")
    writer.resume()
    writer.add(1, {"i": 1})
    with pytest.raises(RuntimeError, match="never reached"):
        writer.close(complete=True)
    assert not done_marker(tmp_path / "o.jsonl").exists()


def test_read_rows_and_count(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"a": 0}\n\n{"a": 1}\n{"a": 2}\n{"a": 3}')
    assert count_rows(data) == 4
    assert [(i, n, r["a"]) for i, n, r in read_rows(data, 1, 3)] == [(1, 3, 1), (2, 4, 2)]
    # skipped rows (done ones) are not even parsed: a bad line among them is no error
    data.write_text('{"a": 0}\nnot json\n{"a": 2}\n')
    assert [i for i, _, _ in read_rows(data, skip=lambda i: i == 1)] == [0, 2]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"a": 1}\n{"a": \n', "in.jsonl:2: not valid JSON"),
        (b'{"a": 1}\n\n[1, 2]\n', "in.jsonl:3: a row must be a JSON object, got list"),
        (b'{"a": 1}\n{"a": "\xff\xfe"}\n', "in.jsonl:2: not valid UTF-8"),
    ],
)
def test_bad_lines_are_named(tmp_path, content, message):
    data = tmp_path / "in.jsonl"
    data.write_bytes(content)
    rows = read_rows(data)
    assert next(rows)[2] == {"a": 1}  # rows before the bad one still come
    with pytest.raises(ServegenError, match=message):
        next(rows)


def test_merge_runs_once_when_all_chunks_are_done(tmp_path):
    parts = [tmp_path / f"output_chunk{i}.jsonl" for i in range(4)]
    for i, part in enumerate(parts):
        part.write_text(f'{{"chunk": {i}}}\n')
    final = tmp_path / "output.jsonl"
    for part in parts[:3]:
        done_marker(part).write_text("")
    assert merge_chunks(final, parts) is False  # chunk 3 still running
    done_marker(parts[3]).write_text("")

    results = []
    threads = [threading.Thread(target=lambda: results.append(merge_chunks(final, parts))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert [r["chunk"] for r in rows_of(final)] == [0, 1, 2, 3]
    assert done_marker(final).exists()
    assert not any(p.exists() or done_marker(p).exists() for p in parts)


def side_records(path, indexes):
    with open(path, "a") as f:
        for i in indexes:
            f.write(json.dumps({"_servegen_row": i, "row": {"i": i}}) + "\n")


def test_resume_takes_back_side_records_from_the_outputs_end_on_and_ignores_those_already_in_it(tmp_path):
    out = tmp_path / "output.jsonl"
    out.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(10)))
    # a kill after the drain moved row 9 into the output, before it emptied the side file
    side_records(tmp_path / "output.jsonl.unordered", [9, 10, 12])
    writer = OrderedWriter(out)
    assert writer.resume() == 12  # rows 0-9 in the output, 10 (moved in by the drain) and 12 waiting
    assert [i for i in range(14) if not writer.is_done(i)] == [11, 13]
    for i in [13, 11]:
        writer.add(i, {"i": i})
    writer.close(complete=True)
    assert [r["i"] for r in rows_of(out)] == list(range(14))


def test_resume_takes_back_the_side_record_of_a_row_whose_output_line_a_kill_cut(tmp_path):
    out = tmp_path / "output.jsonl"
    # the drain was moving rows 10 and 11 from the side file into the output when a kill cut row 11's line
    out.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(11)) + '{"i": 1')
    side_records(tmp_path / "output.jsonl.unordered", [10, 11, 13])
    writer = OrderedWriter(out)
    assert writer.resume() == 13  # rows 0-10 in the output, 11 (from its side record) and 13
    assert [i for i in range(15) if not writer.is_done(i)] == [12, 14]
    for i in [12, 14]:
        writer.add(i, {"i": i})
    writer.close(complete=True)
    assert [r["i"] for r in rows_of(out)] == list(range(15))
