"""``RemoteTier``: a shared Redis/Valkey tier below the node's own (``--remote URL``).

For operators who already run a Redis or Valkey: every node of the mesh (and a node with
no mesh at all) can use one server as a common tier under its CPU and SSD tiers.

* **Write-behind.** A chunk an engine on this node commits is queued and copied to the
  server in the background (``committed`` from the store, ``from_engine`` only: chunks that
  came from a peer or from the server itself are not written back). The queue is bounded
  in bytes; what does not fit, or arrives while the server is unreachable, is dropped and
  counted. The engine never waits for the server.
* **Read on miss.** A lookup whose keys are on no node asks the server (one pipelined
  ``EXISTS`` per lookup, within the lookup's budget) and reports ``remote``; the puller
  then fetches the chunk into the arena, and the engine's read waits for it as for a peer
  pull. A chunk is also fetched from the server when every peer holder failed.
* **Every byte verified.** A value is the chunk's record header (``meshkv.chunk``: key,
  namespace, length, xxh3-64 of the payload, a checksum of its own) followed by the
  payload. A value that does not verify is deleted from the server, counted, and reported
  as a miss: the engine recomputes.
* **TTL and a byte cap,** kept by the server atomically (Lua scripts): each value expires
  ``ttl_s`` after it was last written or read, and the values under ``key_prefix``
  together stay below ``max_bytes`` (the least recently used go first). The accounting
  lives in three keys beside the values (``PREFIX:index``, a sorted set by last use;
  ``PREFIX:sizes``, a hash; ``PREFIX:bytes``, the total), so the cap is shared by every
  node that writes there.
* **Never in the way.** Every call has a deadline; after a failure the tier is skipped
  (lookups report no ``remote`` hits, writes are dropped) for a back-off that doubles from
  0.5 s up to 30 s, then tried again.

Keys: ``PREFIX:c:NAMESPACE:KEY`` (hex). The scripts touch keys they do not declare
(evicted values), so a Redis Cluster is not supported; a standalone server is (tested:
Redis 7.0; Valkey speaks the same protocol and scripting but is not packaged for Debian 12,
so it is untested here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from meshkv.chunk import RECORD_HEADER_BYTES, ChunkKey, NamespaceId, RecordHeader
from meshkv.errors import ChecksumMismatch, ConfigError, MeshKVError, NoSpace, NotReserved
from meshkv.latency import LatencyHistogram
from meshkv.paths import check_private_file

if TYPE_CHECKING:
    from meshkv.store import Store

logger = logging.getLogger(__name__)

REMOTE_OWNER = (1 << 62) + 32
"""Store owner id of the remote tier's pins (copies out) and reservations (fetches in)."""

SCHEMES = {"redis": False, "rediss": True, "valkey": False, "valkeys": True}
"""URL scheme → TLS."""
DEFAULT_PORT = 6379
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
WRITERS = 2
"""Write-behind copies running at once."""
COPY_LEASE_S = 30.0
FETCHES_AT_ONCE = 3
"""Values fetched at once; more wait for a turn (under their deadline). Measured with
8 × 16 MiB values on this 2-core machine: 1 at once 0.50–0.60 GB/s, 2: 0.65–0.69,
3: 0.78, 8: 0.31 (the client parses several large replies at once on one event loop)."""
MAX_CONNECTIONS = 16
SOCKET_READ_BYTES = 1 << 20
"""redis-py reads replies in pieces of this size (its default, 64 KiB, halves the speed of
a 16 MiB value: measured 0.39 vs 0.49 GB/s with the asyncio client here)."""

# A write is one pipelined round trip: SET the value under a fresh temporary name (with a
# short expiry, so a write cut off half-way leaves nothing behind), then this script, which
# keeps the accounting and renames the value into place (O(1): no Lua copy of the bytes).
# KEYS: temporary name, value, index (zset: value -> last use, ms), sizes (hash: value ->
# bytes), total bytes. ARGV: ttl ms, byte cap. Returns {stored 0/1, evicted}.
_COMMIT = """
local ttl = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function forget(k)
  local size = tonumber(redis.call('HGET', KEYS[4], k) or '0')
  redis.call('HDEL', KEYS[4], k)
  redis.call('ZREM', KEYS[3], k)
  if size > 0 then redis.call('DECRBY', KEYS[5], size) end
end
for _, k in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - ttl, 'LIMIT', 0, 64)) do
  forget(k)
  redis.call('DEL', k)
end
local size = redis.call('STRLEN', KEYS[1])
if size == 0 then return {0, 0} end
if redis.call('HEXISTS', KEYS[4], KEYS[2]) == 1 then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('DEL', KEYS[1])
    redis.call('PEXPIRE', KEYS[2], ttl)
    redis.call('ZADD', KEYS[3], now, KEYS[2])
    return {0, 0}
  end
  forget(KEYS[2])
end
if size > cap then
  redis.call('DEL', KEYS[1])
  return {0, 0}
end
local total = tonumber(redis.call('GET', KEYS[5]) or '0')
local evicted = 0
while total + size > cap do
  local oldest = redis.call('ZPOPMIN', KEYS[3])
  if #oldest == 0 then
    total = 0
    break
  end
  total = total - tonumber(redis.call('HGET', KEYS[4], oldest[1]) or '0')
  redis.call('HDEL', KEYS[4], oldest[1])
  redis.call('DEL', oldest[1])
  evicted = evicted + 1
end
if total < 0 then total = 0 end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('HSET', KEYS[4], KEYS[2], size)
redis.call('ZADD', KEYS[3], now, KEYS[2])
redis.call('SET', KEYS[5], total + size)
return {1, evicted}
"""

# A read is one pipelined round trip too: a plain GET (the bytes are not copied through
# Lua) and this script, which renews the value's TTL and its place in the LRU order.
# KEYS: value, index. ARGV: ttl ms.
_TOUCH = """
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 1 and redis.call('ZSCORE', KEYS[2], KEYS[1]) then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), KEYS[1])
end
return 0
"""

TEMP_TTL_MS = 60_000
"""Expiry of a value's temporary name (a write cut off between SET and commit)."""


@dataclass(slots=True)
class RemoteTierConfig:
    """Settings of the remote tier (``[remote]`` in the TOML file, ``--remote*`` flags)."""

    url: str
    """``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``; ``rediss://`` for TLS (``valkey://``
    and ``valkeys://`` are the same)."""
    ttl_s: float = 3600.0
    """A value expires this long after it was last written or read."""
    max_bytes: int = 16 << 30
    """Cap on the bytes of all values under ``key_prefix`` (every node's together)."""
    queue_bytes: int = 256 << 20
    """Write-behind queue: chunks waiting to be copied; beyond it they are dropped."""
    password_file: str | None = None
    """File holding the password (mode 600); instead of one in the URL, which ``ps`` shows."""
    tls_ca_file: str | None = None
    """CA bundle that signed the server's certificate (``rediss://``); default: the system's."""
    key_prefix: str = "meshkv"
    timeout_s: float = 2.0
    """Deadline of one value's write or read (lookups use the lookup's own budget)."""

    def __post_init__(self) -> None:
        parse_url(self.url)
        if not self.ttl_s > 0:
            raise ConfigError(f"remote tier: ttl must be > 0 seconds, got {self.ttl_s}")
        if not self.max_bytes > 0:
            raise ConfigError(f"remote tier: byte cap must be > 0, got {self.max_bytes}")
        if not self.queue_bytes > 0:
            raise ConfigError(f"remote tier: queue bytes must be > 0, got {self.queue_bytes}")
        if not self.timeout_s > 0:
            raise ConfigError(f"remote tier: timeout must be > 0 seconds, got {self.timeout_s}")
        if not self.key_prefix or any(c.isspace() for c in self.key_prefix):
            raise ConfigError(f"remote tier: key prefix must be a word, got {self.key_prefix!r}")
        if self.tls_ca_file is not None and not parse_url(self.url).tls:
            raise ConfigError("remote tier: a TLS CA file needs a rediss:// (or valkeys://) URL")

    def check_ca(self) -> None:
        """Refuse an unreadable or malformed CA file (at start, not at the first call)."""
        if self.tls_ca_file is None:
            return
        try:
            ssl.create_default_context(cafile=self.tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"remote tier: cannot load TLS CA file {self.tls_ca_file}: {exc}"
            ) from None

    def password(self) -> str | None:
        """The password: from ``password_file`` (checked private), else from the URL."""
        parsed = parse_url(self.url)
        if self.password_file is None:
            return parsed.password
        if parsed.password is not None:
            raise ConfigError(
                "remote tier: the URL has a password and a password file is given; use one"
            )
        path = Path(self.password_file)
        try:
            check_private_file(path, "remote password file")
            text = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read remote password file {path}: {exc.strerror}") from exc
        if not text:
            raise ConfigError(f"remote password file {path} is empty")
        return text


@dataclass(frozen=True, slots=True)
class RemoteURL:
    host: str
    port: int
    db: int
    tls: bool
    username: str | None
    password: str | None

    def redacted(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = "***@" if self.password else ""
        return f"{scheme}://{auth}{self.host}:{self.port}/{self.db}"


def parse_url(url: str) -> RemoteURL:
    """Check a ``redis://`` URL; ``ConfigError`` says what is wrong with it."""
    what = "--remote"
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ConfigError(
            f"{what}: URL scheme must be one of {', '.join(SCHEMES)}, got {url!r} "
            "(e.g. redis://127.0.0.1:6379/0)"
        )
    if not parts.hostname:
        raise ConfigError(f"{what}: no host in {_redact(url)!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ConfigError(
            f"{what}: the port is not a number in 1..65535 in {_redact(url)!r}"
        ) from None
    if port == 0:
        raise ConfigError(f"{what}: port 0 in {_redact(url)!r}")
    db_text = parts.path.strip("/")
    if not db_text:
        db = 0
    elif db_text.isdigit():
        db = int(db_text)
    else:
        raise ConfigError(f"{what}: the database must be a number (/0, /1, ...), got /{db_text!r}")
    if parts.query or parts.fragment:
        raise ConfigError(
            f"{what}: URL options (?{parts.query}) are not read; use the --remote-* flags"
        )
    return RemoteURL(
        parts.hostname,
        port,
        db,
        SCHEMES[parts.scheme],
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


@dataclass(slots=True)
class RemoteStats:
    """Counters of the remote tier (metrics: ``meshkv_remote_*``)."""

    writes: int = 0
    """Values stored (new or replaced)."""
    write_bytes: int = 0
    refreshed: int = 0
    """Writes of a value already there (another node stored it): its TTL renewed."""
    evicted: int = 0
    """Values the byte cap pushed out to make room for this node's writes."""
    dropped: Counter[str] = field(default_factory=Counter)
    """Write-behind copies not made: ``queue_full``, ``unavailable``, ``evicted`` (left
    the arena before its turn), ``failed`` (the write itself failed)."""
    reads: int = 0
    """Values fetched, verified and committed into the arena."""
    read_bytes: int = 0
    found: int = 0
    """Lookups' keys the server reported present."""
    misses: int = 0
    """Fetches that found no value (expired or evicted since the lookup)."""
    corrupt: int = 0
    """Values that failed verification (deleted from the server; a miss)."""
    errors: Counter[str] = field(default_factory=Counter)
    """Failed calls by kind: ``timeout``, ``connection``, ``auth``, ``other``."""
    skipped: int = 0
    """Calls not made while the server was backed off."""
    queued_bytes: int = 0
    read_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    write_latency: LatencyHistogram = field(default_factory=LatencyHistogram)


@dataclass(slots=True)
class _Copy:
    ns: NamespaceId
    key: ChunkKey
    size: int


class RemoteTier:
    """The shared tier; see the module docstring. A ``StoreListener``."""

    def __init__(self, config: RemoteTierConfig, store: Store) -> None:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError:  # pragma: no cover - an install without the extra
            raise ConfigError("--remote needs redis-py: pip install 'meshkv[redis]'") from None
        self.config = config
        self.url = parse_url(config.url)
        password = config.password()
        self._store = store
        kwargs: dict[str, Any] = {}
        if self.url.tls:
            config.check_ca()
            kwargs.update(ssl=True, ssl_ca_certs=config.tls_ca_file, ssl_cert_reqs="required")
        self._redis = aioredis.Redis(
            host=self.url.host,
            port=self.url.port,
            db=self.url.db,
            username=self.url.username,
            password=password,
            socket_timeout=config.timeout_s,
            socket_connect_timeout=min(config.timeout_s, 1.0),
            max_connections=MAX_CONNECTIONS,
            socket_read_size=SOCKET_READ_BYTES,
            # No retries inside redis-py: a call either answers within its deadline or
            # fails, and the tier's own back-off decides when to try again.
            retry=Retry(NoBackoff(), 0),
            **kwargs,
        )
        self._commit = self._redis.register_script(_COMMIT)
        self._touch = self._redis.register_script(_TOUCH)
        p = config.key_prefix
        self._index, self._sizes, self._total = f"{p}:index", f"{p}:sizes", f"{p}:bytes"
        self._queue: asyncio.Queue[_Copy] = asyncio.Queue()
        self._writers: list[asyncio.Task[None]] = []
        self._copying = 0
        """Copies the writers are making right now."""
        self._fetches = asyncio.Semaphore(FETCHES_AT_ONCE)
        self._down_until = 0.0
        self._backoff = 0.0
        self.up = False
        """Whether the last call to the server succeeded."""
        self.stats = RemoteStats()
        store.add_listener(self)

    def value_key(self, ns: NamespaceId, key: ChunkKey) -> str:
        return f"{self.config.key_prefix}:c:{ns.hex()}:{key.hex()}"

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writers and try the server once: an unreachable server is logged and
        backed off, not fatal (it may come up after the agent); a refused password is."""
        loop = asyncio.get_running_loop()
        self._writers = [
            loop.create_task(self._writer(), name=f"meshkv-remote-writer-{i}")
            for i in range(WRITERS)
        ]
        from redis.exceptions import AuthenticationError, ResponseError

        try:
            async with asyncio.timeout(self.config.timeout_s):
                await self._redis.ping()
        except (AuthenticationError, ResponseError) as exc:
            if (
                isinstance(exc, AuthenticationError)
                or "NOAUTH" in str(exc)
                or "WRONGPASS" in str(exc)
            ):
                await self.close()
                raise ConfigError(
                    f"remote tier {self.url.redacted()}: the server refused the credentials: {exc}"
                ) from None
            self._failed(exc)
        except Exception as exc:
            self._failed(exc)
            logger.warning(
                "remote tier %s is not reachable at start; the agent serves without it and "
                "tries again in the background",
                self.url.redacted(),
            )
        else:
            self.up = True
            logger.info("remote tier %s reachable", self.url.redacted())

    async def close(self) -> None:
        """Stop the writers (queued copies are dropped) and close the connections."""
        for task in self._writers:
            task.cancel()
        if self._writers:
            await asyncio.wait(self._writers, timeout=1.0)
        self._writers = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            self.stats.queued_bytes -= item.size
        with contextlib.suppress(Exception):
            await self._redis.aclose()

    @property
    def available(self) -> bool:
        """False while backed off after a failure."""
        return asyncio.get_running_loop().time() >= self._down_until

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url.redacted(),
            "up": self.up,
            "backed_off_s": round(
                max(0.0, self._down_until - asyncio.get_running_loop().time()), 3
            ),
            "queued_bytes": self.stats.queued_bytes,
            "ttl_s": self.config.ttl_s,
            "max_bytes": self.config.max_bytes,
        }

    def _ok(self) -> None:
        if self._backoff:
            logger.info("remote tier %s reachable again", self.url.redacted())
        self._backoff = 0.0
        self.up = True

    def _failed(self, exc: BaseException) -> None:
        from redis.exceptions import AuthenticationError, ConnectionError, TimeoutError

        if isinstance(exc, TimeoutError | asyncio.TimeoutError):
            kind = "timeout"
        elif isinstance(exc, AuthenticationError):
            kind = "auth"
        elif isinstance(exc, ConnectionError | OSError):
            kind = "connection"
        else:
            kind = "other"
        self.stats.errors[kind] += 1
        self.up = False
        first = not self._backoff
        self._backoff = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, self._backoff * 2))
        self._down_until = asyncio.get_running_loop().time() + self._backoff
        log = logger.warning if first else logger.debug
        log(
            "remote tier %s failed (%s: %s: %s); skipped for %.1f s",
            self.url.redacted(),
            kind,
            type(exc).__name__,
            exc,
            self._backoff,
        )

    # --- StoreListener -------------------------------------------------------------------

    def committed(self, key: ChunkKey, from_engine: bool) -> None:
        if not from_engine or not self._writers:
            return
        e = self._store.cpu.get(key)
        if e is None:
            return
        st = self.stats
        if not self.available:
            st.dropped["unavailable"] += 1
        elif st.queued_bytes + e.size > self.config.queue_bytes:
            st.dropped["queue_full"] += 1
        else:
            st.queued_bytes += e.size
            self._queue.put_nowait(_Copy(e.ns, key, e.size))

    def dropped(self, keys: list[ChunkKey]) -> None:
        """Nothing to do: a queued copy of a chunk that left is skipped at its turn."""

    def aborted(self, key: ChunkKey) -> None:
        """Nothing to do."""

    # --- write-behind --------------------------------------------------------------------

    async def _writer(self) -> None:
        while True:
            item = await self._queue.get()
            self.stats.queued_bytes -= item.size
            self._copying += 1
            try:
                await self._copy(item)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one copy must not stop the writer
                logger.exception("remote copy of %s failed", item.key.hex())
                self.stats.dropped["failed"] += 1
            finally:
                self._copying -= 1

    async def _copy(self, item: _Copy) -> None:
        st, store = self.stats, self._store
        if not self.available:
            st.dropped["unavailable"] += 1
            return
        pin = store.pin_now(item.ns, item.key, REMOTE_OWNER, COPY_LEASE_S)
        if pin is None:
            st.dropped["evicted"] += 1
            return
        started = time.perf_counter()  # uvloop's loop.time() moves in whole ms
        try:
            checksum = await store.checksum_for(pin)
            header = RecordHeader(item.ns, item.key, pin.num_tokens, pin.slot.length, checksum)
            payload = store.payload(pin.slot)
            temp = f"{self.config.key_prefix}:tmp:{os.urandom(8).hex()}"
            name = self.value_key(item.ns, item.key)
            async with asyncio.timeout(self.config.timeout_s):
                pipe = self._redis.pipeline(transaction=False)
                pipe.set(temp, header.pack(), px=TEMP_TTL_MS)
                pipe.append(temp, payload)  # the arena slot itself: no copy here
                await self._commit(  # queued in the pipeline
                    keys=[temp, name, self._index, self._sizes, self._total],
                    args=[int(self.config.ttl_s * 1000), self.config.max_bytes],
                    client=pipe,
                )
                *_, (stored, evicted) = await pipe.execute()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            st.dropped["failed"] += 1
            self._failed(exc)
            return
        finally:
            with contextlib.suppress(MeshKVError):
                store.release([pin.lease_id], REMOTE_OWNER)
        self._ok()
        st.write_latency.observe(time.perf_counter() - started)
        st.evicted += int(evicted)
        if int(stored):
            st.writes += 1
            st.write_bytes += RECORD_HEADER_BYTES + pin.slot.length
        else:
            st.refreshed += 1

    async def drain(self, timeout: float) -> bool:
        """Wait until the write-behind queue is empty and its copies done (tests, shutdown)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self._queue.qsize() or self._copying:
            if loop.time() >= end:
                return False
            await asyncio.sleep(0.01)
        return True

    # --- reads ---------------------------------------------------------------------------

    async def contains(
        self, ns: NamespaceId, keys: Sequence[ChunkKey], deadline: float
    ) -> list[bool]:
        """Which of ``keys`` the server holds, by ``deadline`` (all False when it cannot
        say in time or is backed off)."""
        if not keys:
            return []
        if not self.available:
            self.stats.skipped += 1
            return [False] * len(keys)
        try:
            async with asyncio.timeout_at(deadline):
                pipe = self._redis.pipeline(transaction=False)
                for key in keys:
                    pipe.exists(self.value_key(ns, key))
                found = await pipe.execute()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
            return [False] * len(keys)
        self._ok()
        out = [bool(x) for x in found]
        self.stats.found += sum(out)
        return out

    async def fetch(self, ns: NamespaceId, key: ChunkKey, deadline: float) -> str | None:
        """Bring ``key`` from the server into the arena: None when it is resident now, else
        why not (``unavailable``, ``error``, ``missing``, ``checksum``, ``no_space``)."""
        st, store = self.stats, self._store
        if not self.available:
            st.skipped += 1
            return "unavailable"
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        name = self.value_key(ns, key)
        try:  # waiting for a turn is not the server's fault: no back-off for it
            async with asyncio.timeout_at(deadline):
                await self._fetches.acquire()
        except TimeoutError:
            return "deadline"
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + self.config.timeout_s)):
                pipe = self._redis.pipeline(transaction=False)
                pipe.get(name)
                await self._touch(  # queued in the pipeline
                    keys=[name, self._index], args=[int(self.config.ttl_s * 1000)], client=pipe
                )
                value, _ = await pipe.execute()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
            return "error"
        finally:
            self._fetches.release()
        self._ok()
        if value is None:
            st.misses += 1
            return "missing"
        raw = memoryview(value)
        try:
            record = RecordHeader.unpack(raw[:RECORD_HEADER_BYTES])
            if record.key != key or record.namespace != ns:
                raise ChecksumMismatch("value is the record of another chunk")
            payload = raw[RECORD_HEADER_BYTES:]
            if payload.nbytes != record.payload_len:
                raise ChecksumMismatch(
                    f"payload length {payload.nbytes} != header's {record.payload_len}"
                )
            if await store.hash(payload, inline=True) != record.checksum:
                raise ChecksumMismatch("payload checksum mismatch")
        except ChecksumMismatch as exc:
            st.corrupt += 1
            logger.warning("remote value of %s rejected and deleted: %s", key.hex(), exc)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.config.timeout_s):
                    await self._redis.delete(name)
            return "checksum"
        try:
            slot = store.reserve(ns, key, record.payload_len, REMOTE_OWNER)
        except NoSpace:
            return "no_space"
        if slot is None:
            return None if store.lookup(ns, [key])[0] is not None else "no_space"
        try:
            store.payload(slot)[:] = payload
            store.commit(ns, key, REMOTE_OWNER, record.num_tokens, record.checksum, wanted=True)
        except NotReserved as exc:
            logger.warning("fetch of %s from the remote tier: %s", key.hex(), exc)
            return "expired"
        except BaseException:
            with contextlib.suppress(MeshKVError):
                store.abort(ns, key, REMOTE_OWNER)
            raise
        st.reads += 1
        st.read_bytes += record.payload_len
        st.read_latency.observe(time.perf_counter() - started)
        return None
