"""Pipeline stages (train, distill, quantize, export, evaluate, register, promote), the runner and the scheduler."""
