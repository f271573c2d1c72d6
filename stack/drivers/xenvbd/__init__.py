"""XENVBD: the PV storage adapter on XENBUS's VBD child (VBD src/xenvbd; reference windows-pv-drivers.md 6, 8).

One adapter per VBD PDO; one target per `device/vbd/<devid>`; per target a blkif frontend with one or more
rings. `driver.DriverEntry` is what the installer's catalog resolves xenvbd.sys to.
"""
