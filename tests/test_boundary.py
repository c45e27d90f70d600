import subprocess
import sys


def test_storygen_imports_no_chat_library():
    code = (
        "import pkgutil, importlib, sys, storygen;"
        "[importlib.import_module('storygen.' + m.name) for m in pkgutil.iter_modules(storygen.__path__)];"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('discord', 'slack_bolt', 'slack_sdk')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bot_shared_layer_imports_no_chat_library():
    code = (
        "import pkgutil, importlib, sys, bot;"
        "[importlib.import_module('bot.' + m.name) for m in pkgutil.iter_modules(bot.__path__)"
        " if m.name not in ('discord', 'slack', '__main__')];"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('discord', 'slack_bolt', 'slack_sdk')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
