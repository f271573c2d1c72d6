"""xenvif.sys: the FDO on XENBUS's VIF child, the netif frontends (one per `device/vif/N`), and the
`XENVIF\\VEN_<PREFIX>&DEV_NET` PDOs that serve the VIF interface to XENNET (XV src/xenvif)."""
