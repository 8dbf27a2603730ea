"""The pool scripts as one Redis Functions library (`FUNCTION LOAD`, then `FCALL`).

Run by EVALSHA, a script executes its whole prelude (`lua/_lib.lua`: some forty helper functions
and a few tables) on every call before its own body; loaded as a library, that code runs once, when
Redis loads it. Measured one call at a time against a pool of 4,125 free addresses (redis-benchmark
`-c 1`, 3,000 calls a round, `INFO commandstats`, nine rounds of each by turns on the 2-CPU VM of the
benchmarks): `allocate_next` 29–45 µs by EVALSHA, 21–29 µs as a function; the prelude alone (the
library's code then `return 1`) cost 9 µs a call by EVALSHA. A library is
replicated and kept in the RDB and AOF like the data, so a promoted replica or a restarted Redis
has it already; when it is missing all the same, the store loads it again.

The library and its functions are named after a digest of their code, so that allocators of two
releases (a rolling upgrade) each call their own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from redis.exceptions import ResponseError

# Redis's answer to an FCALL of a function it does not hold (a Redis without the library).
FUNCTION_NOT_FOUND = "Function not found"


def is_function_missing(reply: object) -> bool:
    """Whether an FCALL's error says that Redis does not hold the function (nothing ran)."""
    return isinstance(reply, ResponseError) and FUNCTION_NOT_FOUND in str(reply)


@dataclass(frozen=True, slots=True)
class PoolLibrary:
    """The library's code (for `FUNCTION LOAD`) and each script's function name (for `FCALL`)."""

    code: str
    functions: dict[str, str]


def _lua(name: str) -> str:
    return resources.files(__package__).joinpath(f"lua/{name}.lua").read_text()


def pool_library(scripts: tuple[str, ...], read_only: frozenset[str]) -> PoolLibrary:
    """Each script's body as a function that binds its KEYS and ARGV first; `read_only` ones are
    flagged `no-writes` (allowed when Redis refuses writes, e.g. out of memory)."""
    bodies = {name: _lua(name) for name in scripts}
    digest = hashlib.sha1("\0".join([_lua("_lib"), *(f"{n}\n{b}" for n, b in bodies.items())]).encode()).hexdigest()
    tag = digest[:12]
    functions = {name: f"ipam_{name}_{tag}" for name in scripts}
    parts = [f"#!lua name=ipam_pool_{tag}", _lua("_lib")]
    for name, body in bodies.items():
        flags = "{'no-writes'}" if name in read_only else "{}"
        parts.append(
            f"redis.register_function{{function_name = '{functions[name]}', flags = {flags},"
            f" callback = function(KEYS, ARGV)\nbind(KEYS, ARGV)\n{body}\nend}}"
        )
    return PoolLibrary("\n".join(parts) + "\n", functions)
