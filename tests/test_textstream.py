from edgeserve.textstream import TextStream


def run(pieces: list[bytes], stop: tuple[str, ...]) -> tuple[list[str], str, bool]:
    ts = TextStream(stop)
    outs = [ts.push(p) for p in pieces]
    tail = ts.finish()
    return outs, "".join(outs) + tail, ts.stopped


def test_no_stop_passes_text_through_at_once() -> None:
    outs, text, stopped = run([b"Hel", b"lo"], ())
    assert outs == ["Hel", "lo"] and text == "Hello" and not stopped


def test_multibyte_character_split_across_tokens_is_held_until_complete() -> None:
    euro = "€".encode()
    outs, text, _ = run([b"a" + euro[:1], euro[1:2], euro[2:] + b"b"], ())
    assert outs == ["a", "", "€b"]
    assert text == "a€b"


def test_stop_sequence_spanning_tokens_is_cut_and_never_released() -> None:
    outs, text, stopped = run([b"one two", b" ST", b"OP three"], ("STOP",))
    assert stopped
    assert text == "one two "
    assert "S" not in "".join(outs)


def test_partial_stop_prefix_is_released_when_it_cannot_match() -> None:
    outs, text, stopped = run([b"ab", b"S", b"x"], ("STOP",))
    assert not stopped
    assert outs == ["ab", "", "Sx"]
    assert text == "abSx"


def test_earliest_of_several_stops_wins() -> None:
    _, text, stopped = run([b"x END y STOP"], ("STOP", "END"))
    assert stopped and text == "x "


def test_held_prefix_released_at_finish() -> None:
    outs, text, stopped = run([b"answer S"], ("STOP",))
    assert outs == ["answer "] and text == "answer S" and not stopped
