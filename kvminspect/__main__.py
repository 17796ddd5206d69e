"""python -m kvminspect"""

from kvminspect.cli import run

run()
