#!/usr/bin/python3
"""make_nbd_corpus.py: writes the seed corpus of nbd_fuzz (tests/fuzz/corpus/nbd/).

Each seed is what a client sends on one connection, from its client flags onwards (the fuzzer
plays the server, which has already sent its greeting). Run it from anywhere; it rewrites the
seeds next to it. The exports the fuzzer knows are "vol0" (1 MiB, the default) and "ro".
"""
import os
import struct

OPT_MAGIC = b"IHAVEOPT"
REQ_MAGIC = 0x25609513
FIXED, NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META = 8, 9, 10
INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 1, 2, 3
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES = 0, 1, 2, 3, 4, 5, 6
FUA, NO_HOLE = 1, 2


def flags(f=FIXED | NO_ZEROES):
    return struct.pack(">I", f)


def option(opt, data=b""):
    return OPT_MAGIC + struct.pack(">II", opt, len(data)) + data


def info_data(name, infos=()):
    name = name.encode()
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) +
            b"".join(struct.pack(">H", i) for i in infos))


def request(cmd, cookie, offset=0, length=0, fl=0, payload=b""):
    return struct.pack(">IHHQQI", REQ_MAGIC, fl, cmd, cookie, offset, length) + payload


SEEDS = {
    "abort": flags() + option(OPT_ABORT),
    "export_name": flags(FIXED) + option(OPT_EXPORT_NAME, b"vol0") +
                   request(READ, 1, 0, 4096) + request(FLUSH, 2) + request(DISC, 3),
    "list_info_go": flags() + option(OPT_LIST) + option(OPT_INFO, info_data("ro")) +
                    option(OPT_GO, info_data("", (INFO_BLOCK_SIZE,))) + request(READ, 1, 512, 512),
    "unsupported_options": flags() + option(OPT_STARTTLS) + option(OPT_STRUCTURED_REPLY) +
                           option(OPT_LIST_META, info_data("vol0")) + option(OPT_SET_META, b"\0" * 8) +
                           option(999, b"junk") + option(OPT_GO, info_data("nope")) +
                           option(OPT_GO, info_data("vol0")) + request(FLUSH, 1),
    "go_then_rw": flags() + option(OPT_GO, info_data("vol0", (INFO_BLOCK_SIZE, INFO_NAME,
                                                             INFO_DESCRIPTION))) +
                  request(WRITE, 1, 0, 16, FUA, b"x" * 16) + request(READ, 2, 0, 16) +
                  request(TRIM, 3, 4096, 4096, FUA) +
                  request(WRITE_ZEROES, 4, 8192, 4096, FUA | NO_HOLE) + request(FLUSH, 5) +
                  request(WRITE, 6, 100, 0) + request(DISC, 7),
    "bad_requests": flags() + option(OPT_GO, info_data("vol0")) +
                    request(9, 1) + request(READ, 2, 0, 512, 0x80) + request(CACHE, 3, 0, 512) +
                    request(READ, 4, (1 << 20) - 8, 16) + request(WRITE, 5, 1 << 20, 4, 0, b"abcd") +
                    request(WRITE, 6, 0, (32 << 20) + 1) + request(FLUSH, 7, 0, 1),
    "read_only": flags() + option(OPT_GO, info_data("ro")) +
                 request(WRITE, 1, 0, 4, FUA, b"abcd") + request(TRIM, 2, 0, 512) +
                 request(READ, 3, 0, 512, FUA),
    "bad_magic": flags() + option(OPT_GO, info_data("vol0")) + struct.pack(">I", 0xdeadbeef) +
                 b"\0" * 24,
}

if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "nbd")
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"{len(SEEDS)} seeds in {out}")
