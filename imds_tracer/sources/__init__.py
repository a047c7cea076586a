"""Where chunks come from: the kernel (BCC) or a pcap. Only the kernel modules import bcc."""
