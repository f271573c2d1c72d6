"""Driver packages and the installer (reference windows-pv-drivers.md 3, 4, 5): INF-like manifests with
versions and revision tables, install/upgrade/remove with the rules of each era, the PnP manager's
driver catalog over the installed packages, and guest set-up from its YAML."""
from .catalog import RegistryCatalog, driver_module_for_image
from .monitor import MonitorAction, MonitorDecision, XenbusMonitor
from .guest import install_from_guest
from .installer import (InstallError, InstallResult, Installer, InstallVetoed, PlatformPciDevice, filters_install,
                        filters_uninstall, installed_package, installed_packages, installed_version, reboot_requests,
                        request_reboot)
from .packages import PACKAGES, Era, Package, Version, get_package, packages_named

__all__ = [name for name in dir() if not name.startswith("_")]
