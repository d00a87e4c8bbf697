import re

from conftest import ROOT


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_commands = [b for b in blocks if b.rstrip().endswith("python -m pytest")]
    assert len(test_commands) == 1, "the README must give exactly one set-up + test command"
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == test_commands[0].strip()
