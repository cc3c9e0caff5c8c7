"""NBD wire constants and structs (the subset a read-only fixed-newstyle client needs).

From the NBD protocol (doc/proto.md in NetworkBlockDevice/nbd).
"""

import struct

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_MASK = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_STARTTLS = 5

REP_ACK = 1
REP_ERR = 1 << 31
REP_NAMES = {
    REP_ERR | 1: "ERR_UNSUP",
    REP_ERR | 2: "ERR_POLICY",
    REP_ERR | 3: "ERR_INVALID",
    REP_ERR | 4: "ERR_PLATFORM",
    REP_ERR | 5: "ERR_TLS_REQD",
    REP_ERR | 6: "ERR_UNKNOWN",
    REP_ERR | 7: "ERR_SHUTDOWN",
    REP_ERR | 8: "ERR_BLOCK_SIZE_REQD",
    REP_ERR | 9: "ERR_TOO_BIG",
}

CMD_READ = 0
CMD_DISC = 2

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_INFO = struct.Struct(">QH")  # size, transmission flags (+124 zeroes unless NO_ZEROES)
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle

ZERO_PAD = 124
MAX_EXPORT_SIZE = 2**63 - 1  # NBD sizes are u64, but nbdkit and qemu stop at INT64_MAX
SECTOR = 512
