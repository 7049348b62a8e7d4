"""The exit statuses of `tokenrig`, one meaning each, so that a script can trust them (README: Exit status).

A run that measured something a script may use exits 0; every status above it says why there is no
answer to use: the run failed, the input was bad, the model does not fit, the measurement is not valid,
the search found no rate, or the user stopped it.
"""

OK = 0
# more than --max-error-rate of the measured requests failed, a load-generator worker was lost, or the records could
# not be written
FAILED = 1
BAD_INPUT = 2  # one line on stderr names the flag and the fix
DOES_NOT_FIT = 3  # a valid question whose answer is no: the model does not fit the GPUs asked for
INVALID = 4  # the load generator, not the server, shaped the result, or the window measured nothing
NO_RATE_FOUND = 5  # --find-max: no rate tried met every SLO
INTERRUPTED = 130  # Ctrl-C or SIGTERM; what finished is kept
