"""xennet.sys: the network adapter over a XENVIF NET PDO (XN src/xennet), with a small IPv4 layer."""
