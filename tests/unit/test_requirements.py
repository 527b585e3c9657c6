"""Reading a function's requirements: what is taken, and each refusal naming its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.errors import RequirementsError
from ember.layers.requirements import parse, read


def test_names_versions_extras_and_markers_are_taken_normalized() -> None:
    text = "# tools\nRequests[socks] >= 2.31  # http\n\nidna==3.7 ; python_version >= '3.8'\n"
    assert parse(text, "requirements.txt").lines == (
        "Requests[socks]>=2.31",
        'idna==3.7; python_version >= "3.8"',
    )


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("-i https://example.invalid/simple", "options are not taken"),
        ("--find-links /srv/wheels", "options are not taken"),
        ("-r other.txt", "options are not taken"),
        ("-e .", "options are not taken"),
        ("pkg @ https://example.invalid/pkg.whl", "by URL or path"),
        ("https://example.invalid/pkg-1.0-py3-none-any.whl", "by URL or path"),
        ("../outside/pkg", "by URL or path"),
        ("/srv/pkg-1.0.tar.gz", "by URL or path"),
        ("pkg ==", "not a requirement"),
        ("msgspec", "part of Ember's runtime"),
        ("Ember", "part of Ember's runtime"),
        ("pkg \\", "line continuations"),
    ],
)
def test_refusals_name_the_line(line: str, says: str) -> None:
    with pytest.raises(RequirementsError) as info:
        parse(f"six\n{line}\n", "requirements.txt")
    assert info.value.status == 422
    assert info.value.message.startswith(f"requirements.txt line 2: {line.strip()!r}: ")
    assert says in info.value.message


def test_a_package_required_twice_is_refused() -> None:
    with pytest.raises(RequirementsError, match="already required on line 1"):
        parse("six\nSix>=1\n", "requirements.txt")


def test_requirements_txt_wins_over_pyproject(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("six\n")
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["idna"]\n')
    found = read(tmp_path)
    assert found is not None and found.lines == ("six",)


def test_pyproject_dependencies(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["idna<4"]\n')
    found = read(tmp_path)
    assert found is not None
    assert (found.source, found.lines) == ("pyproject.toml [project] dependencies", ("idna<4",))


def test_none_when_nothing_is_required(tmp_path: Path) -> None:
    assert read(tmp_path) is None
    (tmp_path / "pyproject.toml").write_text("[tool.ruff]\nline-length = 100\n")
    assert read(tmp_path) is None
    (tmp_path / "requirements.txt").write_text("# nothing yet\n")
    assert read(tmp_path) is None


def test_a_bad_pyproject_is_a_422(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project\n")
    with pytest.raises(RequirementsError, match=r"pyproject.toml: "):
        read(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = "six"\n')
    with pytest.raises(RequirementsError, match="must be a list of strings"):
        read(tmp_path)


def test_the_operators_index_settings_become_uvs_arguments() -> None:
    from ember.layers.uv import PackageIndex

    assert PackageIndex().args() == []
    index = PackageIndex(
        index_url="https://pypi.example/simple",
        extra_index_urls=("https://extra.example/simple",),
        find_links=("/srv/wheels",),
        no_index=True,
        offline=True,
    )
    assert index.args() == [
        "--index-url",
        "https://pypi.example/simple",
        "--extra-index-url",
        "https://extra.example/simple",
        "--find-links",
        "/srv/wheels",
        "--no-index",
        "--offline",
    ]


def test_the_downloads_uv_names_are_read_with_their_size() -> None:
    from ember.layers.uv import downloading

    assert downloading("Downloading pillow (6.8MiB)") == ("pillow", int(6.8 * 2**20))
    assert downloading("Downloading numpy (15.1MiB)") == ("numpy", int(15.1 * 2**20))
    assert downloading("Downloading tiny (900KiB)") == ("tiny", 900 * 1024)
    assert downloading(" Downloaded pillow") is None
    assert downloading("Resolved 6 packages in 256ms") is None
