"""Source prelude for a fresh interpreter in which some top-level packages cannot be imported:
how the tests prove that the runtime works with numpy + an inference backend only."""
from __future__ import annotations

import textwrap


def hide_modules(*names: str) -> str:
    """Python source that makes `import NAME` (and NAME.sub) raise ImportError for each name."""
    return textwrap.dedent(f"""
        import sys
        class _Hide:
            BLOCKED = {tuple(names)!r}
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in self.BLOCKED:
                    raise ImportError(f"{{name}} hidden by the test")
                return None
        sys.meta_path.insert(0, _Hide())
    """)
