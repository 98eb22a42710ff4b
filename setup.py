from setuptools import find_packages, setup

# requirements.txt: the runtime requirements with their bounds (the device installs the exact pins
# of requirements.lock, compiled from this file by scripts/lock.sh).
with open("requirements.txt") as f:
    install_requires = [
        line.split(" #", 1)[0].strip() for line in f if line.strip() and not line.startswith("#")
    ]

setup(
    name="dongle-agent",
    version="0.1.0",
    description="In-car telematics dongle agent: OBD-II/CAN acquisition, store-and-forward, sealed MQTT uplink",
    python_requires=">=3.11",
    # Import names: agent, drivers, firmware_bridge. config/ is data, shipped inside the agent
    # package as agent.config (read with importlib.resources), never a top-level `config`.
    packages=find_packages(include=["agent", "agent.*", "drivers", "drivers.*",
                                    "firmware_bridge", "firmware_bridge.*"]) + ["agent.config"],
    package_dir={"agent.config": "config"},
    package_data={"agent.config": ["*.json", "*.toml", "schemas/*.json", "dbc/*.dbc", "dbc/*.txt", "dbc/*.md",
                                   "ev_profiles/*.json", "dtc/*.csv", "dtc/*.md", "dtc/*.txt"]},
    include_package_data=True,
    install_requires=install_requires,
    entry_points={
        "console_scripts": [
            "dongle-agent=agent.daemon:main",
            "dongle=agent.cli.main:main",
            "dongle-update=agent.update.cli:main",
        ],
    },
)
