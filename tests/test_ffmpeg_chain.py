"""Operator FFmpeg chains (protocol/ffmpeg_chain.py): frame transforms pass, anything that can
open a file or a device or run a command is refused naming the filter."""
from __future__ import annotations

import pytest

from protocol.errors import BadArgument
from protocol.ffmpeg_chain import ALLOWED, REFUSED, ChainError, parse_chain


@pytest.mark.parametrize("text", [
    "yadif_cuda,scale_cuda=640:480", "yadif,scale=640:480", "scale=w=iw/2:h=-2:flags=bicubic",
    "crop=in_w/2:in_h/2,hflip,vflip,transpose=1", "format=gray", "fps=5", "format=yuv420p|gray",
    "hwupload_cuda,scale_cuda=w=224:h=224:format=yuv444p,hwdownload,format=yuv444p",
])
def test_chains_that_only_transform_frames_are_accepted_unchanged(text):
    assert parse_chain(text).text == text


@pytest.mark.parametrize("text, filt", [
    ("movie=/etc/passwd", "movie"),
    ("amovie=http://example.com/a.wav", "amovie"),
    ("sendcmd=f=cmds.txt,scale=10:10", "sendcmd"),
    ("zmq", "zmq"),
    ("azmq=bind_address=tcp//0.0.0.0", "azmq"),
    ("drawtext=textfile=/etc/shadow", "drawtext"),
    ("subtitles=a.srt", "subtitles"),
    ("ass=a.ass", "ass"),
    ("lut3d=file=a.cube", "lut3d"),
    ("haldclut", "haldclut"),
    ("scale=10:10,frei0r=filter_name=x", "frei0r"),
    ("ladspa=file=x", "ladspa"),
    ("dnn_processing=model=m.pb", "dnn_processing"),
    ("libvmaf=log_path=x", "libvmaf"),
    ("psnr=stats_file=x", "psnr"),
])
def test_filters_that_reach_files_devices_or_commands_are_refused_naming_the_filter(text, filt):
    with pytest.raises(ChainError, match=f"filter '{filt}' is refused"):
        parse_chain(text)


@pytest.mark.parametrize("opt", ["filename", "file", "textfile", "fontfile", "stats_file"])
def test_an_option_naming_a_file_is_refused_on_any_filter(opt):
    with pytest.raises(ChainError, match=f"filter 'scale': option '{opt}' is refused"):
        parse_chain(f"scale=10:10:{opt}=/tmp/x")


def test_a_filter_off_the_allow_list_is_refused_listing_what_is_accepted():
    with pytest.raises(ChainError, match="'showinfo' is not on the allow-list.*accepted: .*scale"):
        parse_chain("scale=10:10,showinfo")


@pytest.mark.parametrize("text, what", [
    ("[in]scale=10:10[out]", "link labels"), ("scale=10:10;movie=x", "several chains"),
    ("drawtext=text='a'", "quoting"), (r"scale=min(iw\,640):-2", "escaping"),
    ("scale@a=10:10", "instance names"), ("scale=10:10\nmovie=x", "newlines"),
])
def test_syntax_ffmpeg_parses_differently_is_refused(text, what):
    with pytest.raises(ChainError, match=what):
        parse_chain(text)


def test_every_refused_filter_is_off_the_allow_list():
    assert not set(REFUSED) & ALLOWED


def test_a_refusal_is_a_bad_argument_so_the_daemon_answers_it_and_goes_on():
    assert issubclass(ChainError, BadArgument)


@pytest.mark.parametrize("text", ["", "   ", "scale=", "=10:10", "scale=a=b=c", "x" * 3000])
def test_malformed_chains_are_refused_with_a_reason(text):
    with pytest.raises(ChainError, match="ffmpeg chain"):
        parse_chain(text)


def test_cuda_filters_mark_the_chain_as_needing_a_gpu():
    assert parse_chain("yadif_cuda,scale_cuda=640:480").needs_cuda
    assert not parse_chain("yadif,scale=640:480").needs_cuda
