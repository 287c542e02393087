"""What this NVMe controller says about itself: PCI ids, BAR0 layout and the
Identify Controller limits (device layer, constants only; the controller and
the admin command set both read them)."""

# Placeholders chosen not to collide with QEMU's own NVMe (1b36:0010): no PCI-SIG
# assignment backs them.  The subsystem ids are the same values.
VENDOR_ID = 0xA9A9
DEVICE_ID = 0x0001
CLASS_CODE = 0x010802  # mass storage / non-volatile memory / NVMe I/O controller
BAR0_SIZE = 0x4000
REGISTERS_END, DOORBELLS_END = 0x1000, 0x2000  # registers, then doorbells, in BAR0
MDTS = 7  # 2^7 pages of 4 KiB = 512 KiB per command
CNTLID, CNTRLTYPE_IO = 1, 1
AERL, ACL, ELPE = 3, 3, 15  # 0-based: 4 AERs, 4 aborts, 16 error log entries
WCTEMP, CCTEMP, TEMPERATURE = 343, 373, 313  # Kelvin
#: Copy limits (Identify Namespace): MSSRL and MCL in blocks, MSRC 0-based ranges
MSSRL, MCL, MSRC = 256, 1024, 127
