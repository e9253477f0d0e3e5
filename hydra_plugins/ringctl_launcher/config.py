"""The launcher's Hydra config (`hydra/launcher=ringctl`), registered in the ConfigStore."""

# no `from __future__ import annotations`: Hydra scans this module without registering it
# in sys.modules, and dataclasses then cannot resolve string annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class RingctlLauncherConf:
    _target_: str = "hydra_plugins.ringctl_launcher.ringctl_launcher.RingctlLauncher"
    # block until every job of the sweep ended, with live progress (ringctl launch -m ... wait=true)
    wait: bool = False
    # ringctl launch -m ... --dry-run: print every point's config and the sbatch script(s), submit nothing
    dry_run: bool = False
    # ... --preflight: the dry run plus sbatch --test-only's verdict on each script
    preflight: bool = False


ConfigStore.instance().store(group="hydra/launcher", name="ringctl", node=RingctlLauncherConf, provider="ringctl")
