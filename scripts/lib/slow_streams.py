"""Hold N streamed chat completions open through a gateway, then report its memory.

Each stream is one keep-alive-free HTTP/1.1 connection sending a streamed chat completion to a
slow simulated deployment (one token a second); once every stream has received its response
head and first event, the gateway's resident memory is read from /proc and printed:

    python3 slow_streams.py PORT DEPLOYMENT N GATEWAY_PID
    -> "streams N open OK failed F rss_kib R"

Loopback only; bounded (N connections, each closed after the measurement)."""

import asyncio
import sys

BODY = b'{"messages":[{"role":"user","content":"Tell me a long story"}],"stream":true}'


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def one(port, deployment, opened, hold):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (
            f"POST /openai/deployments/{deployment}/chat/completions?api-version=2024-10-21 HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(BODY)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        writer.write(head + BODY)
        await writer.drain()
        status = (await reader.readuntil(b"\r\n\r\n")).split(b" ", 2)[1]
        if status != b"200":
            return False
        await asyncio.wait_for(reader.readuntil(b"data:"), 30)
        return True
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        return False
    finally:
        opened.release()
        await hold.wait()
        writer.close()


async def main(port, deployment, n, pid):
    opened = asyncio.Semaphore(0)
    hold = asyncio.Event()
    tasks = [asyncio.create_task(one(port, deployment, opened, hold)) for _ in range(n)]
    for _ in range(n):
        await opened.acquire()
    rss = rss_kib(pid)
    hold.set()
    results = await asyncio.gather(*tasks)
    ok = sum(results)
    print(f"streams {n} open {ok} failed {n - ok} rss_kib {rss}")


if __name__ == "__main__":
    port, deployment, n, pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    asyncio.run(main(int(port), deployment, n, pid))
